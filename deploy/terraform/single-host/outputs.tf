output "url" {
  description = "The api role behind nginx."
  value       = "http://${aws_instance.host.public_dns}:${local.ports.nginx}"
}

output "aux_url" {
  description = "The aux role."
  value       = "http://${aws_instance.host.public_dns}:${local.ports.aux}"
}

output "instance_id" {
  description = "For `aws ssm start-session --target` (reading the API key in /opt/konnichiwa/.env)."
  value       = aws_instance.host.id
}
