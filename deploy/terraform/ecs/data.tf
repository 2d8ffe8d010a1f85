# Postgres (RDS) and Valkey (ElastiCache): private, encrypted, reachable only from the tasks.

resource "aws_security_group" "tasks" {
  name        = "${local.name}-tasks"
  description = "Konnichiwa tasks: traffic from the load balancer only"
  vpc_id      = aws_vpc.main.id

  tags = { Name = "${local.name}-tasks" }
}

resource "aws_vpc_security_group_ingress_rule" "tasks_from_alb" {
  security_group_id            = aws_security_group.tasks.id
  description                  = "Service port from the load balancer"
  referenced_security_group_id = aws_security_group.alb.id
  ip_protocol                  = "tcp"
  from_port                    = local.container_port
  to_port                      = local.container_port
}

resource "aws_vpc_security_group_egress_rule" "tasks_https" {
  #checkov:skip=CKV_AWS_382:tasks call AWS APIs (ECR, SSM, S3, Secrets Manager, Logs) over HTTPS through NAT
  security_group_id = aws_security_group.tasks.id
  description       = "AWS APIs over HTTPS"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

resource "aws_vpc_security_group_egress_rule" "tasks_to_stores" {
  for_each                     = { postgres = 5432, redis = 6379 }
  security_group_id            = aws_security_group.tasks.id
  description                  = "To ${each.key}"
  referenced_security_group_id = aws_security_group.stores.id
  ip_protocol                  = "tcp"
  from_port                    = each.value
  to_port                      = each.value
}

resource "aws_security_group" "stores" {
  name        = "${local.name}-stores"
  description = "Konnichiwa Postgres and Valkey: reachable from the tasks only"
  vpc_id      = aws_vpc.main.id

  tags = { Name = "${local.name}-stores" }
}

resource "aws_vpc_security_group_ingress_rule" "stores_from_tasks" {
  for_each                     = { postgres = 5432, redis = 6379 }
  security_group_id            = aws_security_group.stores.id
  description                  = "${each.key} from the tasks"
  referenced_security_group_id = aws_security_group.tasks.id
  ip_protocol                  = "tcp"
  from_port                    = each.value
  to_port                      = each.value
}

# --- Postgres ---------------------------------------------------------------------------------

resource "aws_db_subnet_group" "main" {
  name       = local.name
  subnet_ids = aws_subnet.private[*].id
}

resource "aws_db_parameter_group" "main" {
  name   = local.name
  family = "postgres17"

  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }

  parameter {
    name  = "log_min_duration_statement"
    value = "500"
  }

  parameter {
    name  = "log_statement"
    value = "ddl"
  }
}

resource "aws_db_instance" "main" {
  #checkov:skip=CKV_AWS_161:the service authenticates with a password kept in Secrets Manager
  identifier                            = local.name
  engine                                = "postgres"
  engine_version                        = "17"
  instance_class                        = var.db_instance_class
  allocated_storage                     = 20
  max_allocated_storage                 = 200
  storage_type                          = "gp3"
  storage_encrypted                     = true
  kms_key_id                            = aws_kms_key.main.arn
  db_name                               = "konnichiwa"
  username                              = "konnichiwa"
  password                              = random_password.database.result
  db_subnet_group_name                  = aws_db_subnet_group.main.name
  parameter_group_name                  = aws_db_parameter_group.main.name
  vpc_security_group_ids                = [aws_security_group.stores.id]
  publicly_accessible                   = false
  multi_az                              = true
  backup_retention_period               = 14
  backup_window                         = "17:00-18:00"
  maintenance_window                    = "sun:18:30-sun:19:30"
  copy_tags_to_snapshot                 = true
  deletion_protection                   = true
  skip_final_snapshot                   = false
  final_snapshot_identifier             = "${local.name}-final"
  auto_minor_version_upgrade            = true
  enabled_cloudwatch_logs_exports       = ["postgresql", "upgrade"]
  performance_insights_enabled          = true
  performance_insights_kms_key_id       = aws_kms_key.main.arn
  performance_insights_retention_period = 7
  monitoring_interval                   = 60
  monitoring_role_arn                   = aws_iam_role.rds_monitoring.arn
}

resource "aws_iam_role" "rds_monitoring" {
  name = "${local.name}-rds-monitoring"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "monitoring.rds.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
}

resource "aws_iam_role_policy_attachment" "rds_monitoring" {
  role       = aws_iam_role.rds_monitoring.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}

# --- Valkey -----------------------------------------------------------------------------------

resource "aws_elasticache_subnet_group" "main" {
  name       = local.name
  subnet_ids = aws_subnet.private[*].id
}

# Never evict: the state, the audit outbox and the idempotency records are data, not a cache
# (ElastiCache's default groups evict keys that have a TTL, volatile-lru). ElastiCache sets
# maxmemory from the node type; a full node refuses writes, which the service answers with a
# 503, and the memory alarm below fires well before that.
resource "aws_elasticache_parameter_group" "main" {
  name        = local.name
  family      = "valkey8"
  description = "Konnichiwa: never evict state, outbox or idempotency records"

  parameter {
    name  = "maxmemory-policy"
    value = "noeviction"
  }
}

# A primary with a replica in another AZ and automatic failover: Multi-AZ instead of AOF
# (ElastiCache offers no AOF on Valkey/Redis 7+, hence no appendfsync). Replication is
# asynchronous: a failover can lose the last writes the replica had not received, acknowledged
# or not (docs/reliability.md); MemoryDB is the durable alternative.
resource "aws_elasticache_replication_group" "main" {
  replication_group_id       = local.name
  description                = "Konnichiwa shared state and audit outbox"
  engine                     = "valkey"
  engine_version             = "8.0"
  node_type                  = var.cache_node_type
  num_cache_clusters         = 2
  port                       = 6379
  parameter_group_name       = aws_elasticache_parameter_group.main.name
  subnet_group_name          = aws_elasticache_subnet_group.main.name
  security_group_ids         = [aws_security_group.stores.id]
  automatic_failover_enabled = true
  multi_az_enabled           = true
  at_rest_encryption_enabled = true
  kms_key_id                 = aws_kms_key.main.arn
  transit_encryption_enabled = true
  auth_token                 = random_password.redis.result
  snapshot_retention_limit   = 7
  snapshot_window            = "16:00-17:00"
  maintenance_window         = "sun:19:30-sun:20:30"
  auto_minor_version_upgrade = true
  apply_immediately          = false
}

# Each node's memory use (percent of its maxmemory): with noeviction, the last warning before
# writes are refused. Members are named <group>-001, -002, ...
resource "aws_cloudwatch_metric_alarm" "valkey_memory" {
  for_each = toset([
    for n in range(1, aws_elasticache_replication_group.main.num_cache_clusters + 1) :
    format("%s-%03d", aws_elasticache_replication_group.main.replication_group_id, n)
  ])
  alarm_name          = "${each.key}-memory-high"
  alarm_description   = "Konnichiwa Valkey ${each.key}: memory above 80 % of maxmemory; writes fail at 100 %"
  namespace           = "AWS/ElastiCache"
  metric_name         = "DatabaseMemoryUsagePercentage"
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 3
  threshold           = 80
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = var.alarm_topic_arn == "" ? [] : [var.alarm_topic_arn]
  ok_actions          = var.alarm_topic_arn == "" ? [] : [var.alarm_topic_arn]

  dimensions = {
    CacheClusterId = each.key
  }
}

# --- Secrets: injected into the tasks by ECS, never as plain environment variables -------------

resource "random_password" "database" {
  length  = 32
  special = false
}

resource "random_password" "redis" {
  length  = 48
  special = false
}

resource "random_password" "api_key" {
  length  = 43
  special = false
}

locals {
  # Secret name => value; each becomes a secret the task definition injects as that variable.
  secret_values = {
    API_KEYS     = random_password.api_key.result
    DATABASE_URL = "postgresql://konnichiwa:${random_password.database.result}@${aws_db_instance.main.address}:5432/konnichiwa?sslmode=require"
    REDIS_URL    = "rediss://:${random_password.redis.result}@${aws_elasticache_replication_group.main.primary_endpoint_address}:6379/0"
  }
}

resource "aws_secretsmanager_secret" "service" {
  #checkov:skip=CKV2_AWS_57:rotation means changing the RDS/ElastiCache passwords with the secret; rotate API keys by adding one to API_KEYS (see docs/configuration.md, "API keys")
  for_each                = local.secret_values
  name                    = "konnichiwa/${var.environment}/${each.key}"
  description             = "Konnichiwa ${each.key} for the ${var.environment} tasks"
  kms_key_id              = aws_kms_key.main.arn
  recovery_window_in_days = 7
}

resource "aws_secretsmanager_secret_version" "service" {
  for_each      = local.secret_values
  secret_id     = aws_secretsmanager_secret.service[each.key].id
  secret_string = each.value
}
