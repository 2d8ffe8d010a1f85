# The cheapest deployment: one EC2 instance running the compose stack (compose.yaml) — nginx on
# 8080 in front of api, aux on 4001, Valkey, Postgres and the AWS emulator. Only the deployer's
# addresses reach it; there is no SSH (use SSM Session Manager).

# Ubuntu 24.04 LTS: Docker and its compose plugin come from the distribution's packages.
data "aws_ssm_parameter" "ubuntu" {
  name = "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
}

locals {
  name  = "konnichiwa-single-host"
  ports = { nginx = 8080, aux = 4001 }
}

# The account's default VPC: the cheapest variant builds no network of its own.
data "aws_vpc" "default" {
  default = true
}

resource "aws_security_group" "host" {
  name        = local.name
  description = "Konnichiwa single host: the deployer's addresses only"
  vpc_id      = data.aws_vpc.default.id

  tags = { Name = local.name }
}

resource "aws_vpc_security_group_ingress_rule" "deployer" {
  for_each          = local.ports
  security_group_id = aws_security_group.host.id
  description       = "${each.key} from the deployer"
  cidr_ipv4         = var.deployer_cidr
  ip_protocol       = "tcp"
  from_port         = each.value
  to_port           = each.value
}

resource "aws_vpc_security_group_egress_rule" "https" {
  #checkov:skip=CKV_AWS_382:the host pulls images and packages over HTTPS and reaches SSM
  security_group_id = aws_security_group.host.id
  description       = "Images, packages and SSM over HTTPS"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

resource "aws_iam_role" "host" {
  name = local.name
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "ec2.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
}

# Session Manager instead of SSH; the app itself talks to the emulator in the stack, not to AWS.
resource "aws_iam_role_policy_attachment" "ssm" {
  role       = aws_iam_role.host.name
  policy_arn = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_instance_profile" "host" {
  name = local.name
  role = aws_iam_role.host.name
}

resource "aws_instance" "host" {
  #checkov:skip=CKV_AWS_88:the single host is reached directly on its public address (security group limits who)
  ami                         = data.aws_ssm_parameter.ubuntu.value
  instance_type               = var.instance_type
  iam_instance_profile        = aws_iam_instance_profile.host.name
  vpc_security_group_ids      = [aws_security_group.host.id]
  associate_public_ip_address = true
  monitoring                  = true
  ebs_optimized               = true
  user_data_replace_on_change = true

  user_data = templatefile("${path.module}/user-data.sh.tftpl", {
    repository_url = var.repository_url
    git_ref        = var.git_ref
  })

  metadata_options {
    http_tokens   = "required"
    http_endpoint = "enabled"
  }

  root_block_device {
    volume_size = 30
    volume_type = "gp3"
    encrypted   = true
  }

  tags = { Name = local.name }
}
