# Who may do what. Execution role: ECS itself (pull the image, read the secrets, write logs).
# Task roles: the service's own AWS calls, one role per service role, least privilege.

locals {
  ecs_tasks_trust = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "ecs-tasks.amazonaws.com" }
      Action    = "sts:AssumeRole"
      Condition = { ArnLike = { "aws:SourceArn" = "arn:${data.aws_partition.current.partition}:ecs:${var.region}:${data.aws_caller_identity.current.account_id}:*" } }
    }]
  })

  ssm_parameter_arn = "arn:${data.aws_partition.current.partition}:ssm:${var.region}:${data.aws_caller_identity.current.account_id}:parameter"

  # What each role's code calls: both read their SSM path (SecureString values are decrypted
  # with the AWS-managed SSM key); only `api` serves /storage, which lists the account's buckets.
  task_role_statements = {
    api = [
      {
        Sid      = "ReadOwnConfig"
        Effect   = "Allow"
        Action   = ["ssm:GetParameter", "ssm:GetParameters", "ssm:GetParametersByPath"]
        Resource = ["${local.ssm_parameter_arn}/konnichiwa/${var.environment}/api", "${local.ssm_parameter_arn}/konnichiwa/${var.environment}/api/*"]
      },
      {
        Sid       = "DecryptSecureStrings"
        Effect    = "Allow"
        Action    = ["kms:Decrypt"]
        Resource  = ["arn:${data.aws_partition.current.partition}:kms:${var.region}:${data.aws_caller_identity.current.account_id}:alias/aws/ssm"]
        Condition = { StringEquals = { "kms:ViaService" = "ssm.${var.region}.amazonaws.com" } }
      },
      {
        Sid      = "ListBuckets"
        Effect   = "Allow"
        Action   = ["s3:ListAllMyBuckets"]
        Resource = ["*"]
      },
    ]
    aux = [
      {
        Sid      = "ReadOwnConfig"
        Effect   = "Allow"
        Action   = ["ssm:GetParameter", "ssm:GetParameters", "ssm:GetParametersByPath"]
        Resource = ["${local.ssm_parameter_arn}/konnichiwa/${var.environment}/aux", "${local.ssm_parameter_arn}/konnichiwa/${var.environment}/aux/*"]
      },
      {
        Sid       = "DecryptSecureStrings"
        Effect    = "Allow"
        Action    = ["kms:Decrypt"]
        Resource  = ["arn:${data.aws_partition.current.partition}:kms:${var.region}:${data.aws_caller_identity.current.account_id}:alias/aws/ssm"]
        Condition = { StringEquals = { "kms:ViaService" = "ssm.${var.region}.amazonaws.com" } }
      },
    ]
  }
}

resource "aws_iam_role" "execution" {
  name               = "${local.name}-execution"
  description        = "ECS pulls the Konnichiwa image, reads its secrets and writes its logs"
  assume_role_policy = local.ecs_tasks_trust
}

resource "aws_iam_role_policy_attachment" "execution" {
  role       = aws_iam_role.execution.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

resource "aws_iam_role_policy" "execution_secrets" {
  name = "read-service-secrets"
  role = aws_iam_role.execution.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid      = "ReadSecrets"
        Effect   = "Allow"
        Action   = ["secretsmanager:GetSecretValue"]
        Resource = [for secret in aws_secretsmanager_secret.service : secret.arn]
      },
      {
        Sid      = "DecryptSecrets"
        Effect   = "Allow"
        Action   = ["kms:Decrypt"]
        Resource = [aws_kms_key.main.arn]
      },
    ]
  })
}

resource "aws_iam_role" "task" {
  for_each           = local.task_role_statements
  name               = "${local.name}-${each.key}-task"
  description        = "The Konnichiwa ${each.key} service's own AWS calls"
  assume_role_policy = local.ecs_tasks_trust
}

resource "aws_iam_role_policy" "task" {
  #checkov:skip=CKV_AWS_355:s3:ListAllMyBuckets supports no resource but "*"
  for_each = local.task_role_statements
  name     = "${each.key}-service"
  role     = aws_iam_role.task[each.key].id
  policy   = jsonencode({ Version = "2012-10-17", Statement = each.value })
}

# --- GitHub Actions deploys with short-lived OIDC credentials, never stored keys --------------

resource "aws_iam_openid_connect_provider" "github" {
  url            = "https://token.actions.githubusercontent.com"
  client_id_list = ["sts.amazonaws.com"]
}

resource "aws_iam_role" "deploy" {
  name        = "${local.name}-github-deploy"
  description = "GitHub Actions on ${var.github_repository} main: push images, roll the ECS services"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Federated = aws_iam_openid_connect_provider.github.arn }
      Action    = "sts:AssumeRoleWithWebIdentity"
      Condition = {
        StringEquals = {
          "token.actions.githubusercontent.com:aud" = "sts.amazonaws.com"
          "token.actions.githubusercontent.com:sub" = "repo:${var.github_repository}:ref:refs/heads/main"
        }
      }
    }]
  })
}

resource "aws_iam_role_policy" "deploy" {
  #checkov:skip=CKV_AWS_355:ecr:GetAuthorizationToken and the ecs:*TaskDefinition actions support no resource but "*"
  #checkov:skip=CKV_AWS_290:ecs:RegisterTaskDefinition has no resource-level permissions; PassRole is limited to the service's roles
  name = "push-and-roll"
  role = aws_iam_role.deploy.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid      = "EcrLogin"
        Effect   = "Allow"
        Action   = ["ecr:GetAuthorizationToken"]
        Resource = ["*"]
      },
      {
        Sid    = "EcrPush"
        Effect = "Allow"
        Action = [
          "ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:CompleteLayerUpload",
          "ecr:InitiateLayerUpload", "ecr:PutImage", "ecr:UploadLayerPart", "ecr:DescribeImages",
        ]
        Resource = [aws_ecr_repository.service.arn]
      },
      {
        Sid      = "TaskDefinitions"
        Effect   = "Allow"
        Action   = ["ecs:DescribeTaskDefinition", "ecs:RegisterTaskDefinition"]
        Resource = ["*"]
      },
      {
        Sid      = "RollServices"
        Effect   = "Allow"
        Action   = ["ecs:UpdateService", "ecs:DescribeServices"]
        Resource = [for service in aws_ecs_service.service : service.id]
      },
      {
        Sid       = "PassServiceRoles"
        Effect    = "Allow"
        Action    = ["iam:PassRole"]
        Resource  = concat([aws_iam_role.execution.arn], [for role in aws_iam_role.task : role.arn])
        Condition = { StringEquals = { "iam:PassedToService" = "ecs-tasks.amazonaws.com" } }
      },
    ]
  })
}

# --- Kubernetes (IRSA): the same permissions for the pods' ServiceAccounts ----------------------

locals {
  eks_oidc_issuer = replace(var.eks_oidc_provider_arn, "/^arn:aws:iam::[0-9]+:oidc-provider//", "")
  irsa_roles      = var.eks_oidc_provider_arn == "" ? {} : local.task_role_statements
}

resource "aws_iam_role" "irsa" {
  for_each    = local.irsa_roles
  name        = "${local.name}-${each.key}-irsa"
  description = "ServiceAccount konnichiwa/konnichiwa-${each.key} on EKS"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Federated = var.eks_oidc_provider_arn }
      Action    = "sts:AssumeRoleWithWebIdentity"
      Condition = {
        StringEquals = {
          "${local.eks_oidc_issuer}:aud" = "sts.amazonaws.com"
          "${local.eks_oidc_issuer}:sub" = "system:serviceaccount:konnichiwa:konnichiwa-${each.key}"
        }
      }
    }]
  })
}

resource "aws_iam_role_policy" "irsa" {
  #checkov:skip=CKV_AWS_355:s3:ListAllMyBuckets supports no resource but "*"
  for_each = local.irsa_roles
  name     = "${each.key}-service"
  role     = aws_iam_role.irsa[each.key].id
  policy   = jsonencode({ Version = "2012-10-17", Statement = each.value })
}
