// Starts Swagger UI on /docs. A file of its own, not an inline script: the page's Content
// Security Policy allows scripts from this service only.
window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true});
