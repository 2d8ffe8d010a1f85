locals {
  roles = toset(["api", "aux"])

  # Settings every task gets: konnichiwa/settings.py VARIABLES (tests/test_deploy.py checks that
  # each one the service needs is here, in role_environment or in the secrets).
  task_environment = {
    PORT           = tostring(local.container_port)
    HOST           = "0.0.0.0"
    WORKERS        = tostring(var.workers)
    ENVIRONMENT    = var.environment
    LOG_LEVEL      = var.log_level
    LOG_FORMAT     = "json"
    ACCESS_LOG     = "false"
    AWS_REGION     = var.region
    MAX_BODY_BYTES = tostring(var.max_body_bytes)
    # SSM answers are cached (its quota is ~40 requests/s) and served stale while AWS fails.
    CONFIG_CACHE_SECONDS    = "30"
    CONFIG_STALE_SECONDS    = "300"
    API_KEY_REFRESH_SECONDS = "300"
    # Requests per window: per API key by route class, per client address when anonymous and
    # for failed authentication. The ALB, inside the VPC, names the client in X-Forwarded-For.
    RATE_LIMIT_READS         = "10000/10s"
    RATE_LIMIT_WRITES        = "2000/10s"
    RATE_LIMIT_INSPECT       = "600/min"
    RATE_LIMIT_CONFIG        = "600/min"
    RATE_LIMIT_ANONYMOUS     = "1000/10s"
    RATE_LIMIT_AUTH_FAILURES = "20/2min"
    TRUSTED_PROXIES          = var.vpc_cidr
  }

  # Each role's own settings: its name and the SSM path its task role may read.
  role_environment = {
    api = { SERVICE_NAME = "api", SSM_PREFIX = "/konnichiwa/${var.environment}/api/" }
    aux = { SERVICE_NAME = "aux", SSM_PREFIX = "/konnichiwa/${var.environment}/aux/" }
  }

  image = "${aws_ecr_repository.service.repository_url}:${var.image_tag}"
}

resource "aws_ecs_cluster" "main" {
  name = local.name

  setting {
    name  = "containerInsights"
    value = "enabled"
  }

  configuration {
    execute_command_configuration {
      kms_key_id = aws_kms_key.main.arn
      logging    = "OVERRIDE"

      log_configuration {
        cloud_watch_encryption_enabled = true
        cloud_watch_log_group_name     = aws_cloudwatch_log_group.exec.name
      }
    }
  }
}

resource "aws_cloudwatch_log_group" "exec" {
  name              = "/konnichiwa/${var.environment}/ecs-exec"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.main.arn
}

resource "aws_cloudwatch_log_group" "service" {
  for_each          = local.roles
  name              = "/konnichiwa/${var.environment}/${each.key}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.main.arn
}

resource "aws_ecs_task_definition" "service" {
  for_each                 = local.roles
  family                   = "${local.name}-${each.key}"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.task_cpu
  memory                   = var.task_memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.task[each.key].arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }

  # The root filesystem is read-only: /tmp and the state directory are task-local volumes.
  volume {
    name = "tmp"
  }

  volume {
    name = "state"
  }

  container_definitions = jsonencode([{
    name                   = each.key
    image                  = local.image
    essential              = true
    readonlyRootFilesystem = true
    privileged             = false
    user                   = "10001:10001"
    portMappings           = [{ containerPort = local.container_port, protocol = "tcp" }]
    environment = [
      for name, value in merge(local.task_environment, local.role_environment[each.key]) :
      { name = name, value = value }
    ]
    secrets = [
      for name, secret in aws_secretsmanager_secret.service : { name = name, valueFrom = secret.arn }
    ]
    mountPoints = [
      { sourceVolume = "tmp", containerPath = "/tmp", readOnly = false },
      { sourceVolume = "state", containerPath = "/var/lib/konnichiwa", readOnly = false },
    ]
    healthCheck = {
      command     = ["CMD", "python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${local.container_port}/health', timeout=2)"]
      interval    = 15
      timeout     = 5
      retries     = 3
      startPeriod = 30
    }
    stopTimeout = 30
    linuxParameters = {
      capabilities       = { drop = ["ALL"] }
      initProcessEnabled = true
    }
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.service[each.key].name
        awslogs-region        = var.region
        awslogs-stream-prefix = each.key
      }
    }
  }])
}

resource "aws_ecs_service" "service" {
  for_each                           = local.roles
  name                               = each.key
  cluster                            = aws_ecs_cluster.main.id
  task_definition                    = aws_ecs_task_definition.service[each.key].arn
  desired_count                      = var.desired_count
  launch_type                        = "FARGATE"
  platform_version                   = "LATEST"
  health_check_grace_period_seconds  = 30
  deployment_minimum_healthy_percent = 100
  deployment_maximum_percent         = 200
  propagate_tags                     = "SERVICE"
  enable_execute_command             = false

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  network_configuration {
    subnets          = aws_subnet.private[*].id
    security_groups  = [aws_security_group.tasks.id]
    assign_public_ip = false
  }

  load_balancer {
    target_group_arn = aws_lb_target_group.service[each.key].arn
    container_name   = each.key
    container_port   = local.container_port
  }

  # CI rolls new images by registering task definition revisions; autoscaling owns the count.
  lifecycle {
    ignore_changes = [task_definition, desired_count]
  }

  depends_on = [aws_lb_listener.https]
}

# --- Autoscaling (the alarms are in alarms.tf) ------------------------------------------------

resource "aws_appautoscaling_target" "service" {
  for_each           = local.roles
  service_namespace  = "ecs"
  resource_id        = "service/${aws_ecs_cluster.main.name}/${aws_ecs_service.service[each.key].name}"
  scalable_dimension = "ecs:service:DesiredCount"
  min_capacity       = var.desired_count
  max_capacity       = var.max_count
}

locals {
  # Target tracking: CPU at 70 %, memory at 75 %, for each role.
  scaling_targets = {
    for pair in setproduct(local.roles, [["cpu", "ECSServiceAverageCPUUtilization", 70], ["memory", "ECSServiceAverageMemoryUtilization", 75]]) :
    "${pair[0]}-${pair[1][0]}" => { role = pair[0], metric = pair[1][1], target = pair[1][2] }
  }
}

resource "aws_appautoscaling_policy" "service" {
  for_each           = local.scaling_targets
  name               = "${local.name}-${each.key}"
  policy_type        = "TargetTrackingScaling"
  service_namespace  = aws_appautoscaling_target.service[each.value.role].service_namespace
  resource_id        = aws_appautoscaling_target.service[each.value.role].resource_id
  scalable_dimension = aws_appautoscaling_target.service[each.value.role].scalable_dimension

  target_tracking_scaling_policy_configuration {
    target_value       = each.value.target
    scale_in_cooldown  = 120
    scale_out_cooldown = 60

    predefined_metric_specification {
      predefined_metric_type = each.value.metric
    }
  }
}
