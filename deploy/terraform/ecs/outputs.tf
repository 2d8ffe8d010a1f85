output "api_url" {
  description = "The api role, once domain_name points at the load balancer."
  value       = "https://${var.domain_name}"
}

output "aux_url" {
  description = "The aux role (its own HTTPS port on the same load balancer)."
  value       = "https://${var.domain_name}:${local.listener_ports.aux}"
}

output "load_balancer_dns_name" {
  description = "Point domain_name at this name (a CNAME or a Route 53 alias)."
  value       = aws_lb.main.dns_name
}

output "waf_web_acl_arn" {
  description = "The rate-limiting web ACL; deploy/kubernetes's ingress attaches its ALB to it too."
  value       = aws_wafv2_web_acl.main.arn
}

output "ecr_repository_url" {
  description = "Where CI pushes the image."
  value       = aws_ecr_repository.service.repository_url
}

output "ecs_cluster" {
  description = "The ECS cluster running the api and aux services."
  value       = aws_ecs_cluster.main.name
}

output "deploy_role_arn" {
  description = "Role GitHub Actions assumes over OIDC (the AWS_DEPLOY_ROLE_ARN repository variable)."
  value       = aws_iam_role.deploy.arn
}

output "api_keys_secret" {
  description = "Secrets Manager secret holding API_KEYS (read it with the AWS CLI)."
  value       = aws_secretsmanager_secret.service["API_KEYS"].name
}
