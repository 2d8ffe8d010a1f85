# CloudWatch alarms on what CloudWatch itself sees of the service (the load balancer and ECS), at
# the levels of the Prometheus alerts in deploy/prometheus/rules/alerts.yml. The alerts on figures
# only the service knows (audit backlog, event loop lag, worker restarts, rate-limited share) need
# its /metrics scraped: docs/operations/monitoring.md says how, and why CloudWatch has no twin.

locals {
  alarm_actions = var.alarm_topic_arn == "" ? [] : [var.alarm_topic_arn]
  # As KonnichiwaCpuHigh/Critical and KonnichiwaMemoryHigh/Critical (and `konnichiwa monitor`):
  # 70 % warns, 90 % is critical (tests/test_deploy.py compares them with the alerts).
  utilization_levels = {
    "cpu-high"        = { metric = "CPUUtilization", threshold = 70, minutes = 10 }
    "cpu-critical"    = { metric = "CPUUtilization", threshold = 90, minutes = 5 }
    "memory-high"     = { metric = "MemoryUtilization", threshold = 70, minutes = 10 }
    "memory-critical" = { metric = "MemoryUtilization", threshold = 90, minutes = 5 }
  }
  # The percentage of requests the tasks answered 5xx, as KonnichiwaServerErrors(Critical).
  server_error_levels = {
    "server-errors"          = { percent = 1, minutes = 10 }
    "server-errors-critical" = { percent = 5, minutes = 5 }
  }
  utilization_alarms = {
    for pair in setproduct(local.roles, keys(local.utilization_levels)) :
    "${pair[0]}-${pair[1]}" => merge(local.utilization_levels[pair[1]], { role = pair[0] })
  }
  server_error_alarms = {
    for pair in setproduct(local.roles, keys(local.server_error_levels)) :
    "${pair[0]}-${pair[1]}" => merge(local.server_error_levels[pair[1]], { role = pair[0] })
  }
  target_dimensions = {
    for role in local.roles : role => {
      LoadBalancer = aws_lb.main.arn_suffix
      TargetGroup  = aws_lb_target_group.service[role].arn_suffix
    }
  }
}

# The alarm that watched CPU alone is now the cpu-high one of these.
moved {
  from = aws_cloudwatch_metric_alarm.cpu["api"]
  to   = aws_cloudwatch_metric_alarm.utilization["api-cpu-high"]
}

moved {
  from = aws_cloudwatch_metric_alarm.cpu["aux"]
  to   = aws_cloudwatch_metric_alarm.utilization["aux-cpu-high"]
}

resource "aws_cloudwatch_metric_alarm" "utilization" {
  for_each            = local.utilization_alarms
  alarm_name          = "${local.name}-${each.key}"
  alarm_description   = "Konnichiwa ${each.value.role}: average ${each.value.metric} above ${each.value.threshold} % for ${each.value.minutes} minutes"
  namespace           = "AWS/ECS"
  metric_name         = each.value.metric
  statistic           = "Average"
  period              = 60
  evaluation_periods  = each.value.minutes
  threshold           = each.value.threshold
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions

  dimensions = {
    ClusterName = aws_ecs_cluster.main.name
    ServiceName = aws_ecs_service.service[each.value.role].name
  }
}

# The share of requests the tasks answered with a 5xx. The load balancer's health checks are not
# requests here, so this is user traffic, as in the Prometheus rule.
resource "aws_cloudwatch_metric_alarm" "server_errors" {
  for_each            = local.server_error_alarms
  alarm_name          = "${local.name}-${each.key}"
  alarm_description   = "Konnichiwa ${each.value.role}: over ${each.value.percent} % of requests answered 5xx for ${each.value.minutes} minutes"
  comparison_operator = "GreaterThanThreshold"
  threshold           = each.value.percent
  evaluation_periods  = each.value.minutes
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions

  metric_query {
    id          = "share"
    expression  = "100 * FILL(errors, 0) / requests"
    label       = "5xx answers (%)"
    return_data = true
  }

  metric_query {
    id = "errors"

    metric {
      namespace   = "AWS/ApplicationELB"
      metric_name = "HTTPCode_Target_5XX_Count"
      period      = 60
      stat        = "Sum"
      dimensions  = local.target_dimensions[each.value.role]
    }
  }

  metric_query {
    id = "requests"

    metric {
      namespace   = "AWS/ApplicationELB"
      metric_name = "RequestCount"
      period      = 60
      stat        = "Sum"
      dimensions  = local.target_dimensions[each.value.role]
    }
  }
}

# The latency objective (95 % within 300 ms). A CloudWatch alarm has one window, so there is no
# pair of burn-rate windows: this fires when the p95 the load balancer measured stayed above
# 300 ms for 15 minutes (the budget burning faster than it may, for long enough to matter).
resource "aws_cloudwatch_metric_alarm" "latency" {
  for_each            = local.roles
  alarm_name          = "${local.name}-${each.key}-latency"
  alarm_description   = "Konnichiwa ${each.key}: p95 of the time to answer above 300 ms for 15 minutes"
  namespace           = "AWS/ApplicationELB"
  metric_name         = "TargetResponseTime"
  extended_statistic  = "p95"
  period              = 60
  evaluation_periods  = 15
  threshold           = 0.3
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  dimensions          = local.target_dimensions[each.key]
}

# Readiness fails while Redis or Postgres does not answer (KonnichiwaDependencyDown): the load
# balancer then counts the task unhealthy.
resource "aws_cloudwatch_metric_alarm" "unhealthy_tasks" {
  for_each            = local.roles
  alarm_name          = "${local.name}-${each.key}-unhealthy-tasks"
  alarm_description   = "Konnichiwa ${each.key}: a task has failed its readiness check (Redis or Postgres down) for 2 minutes"
  namespace           = "AWS/ApplicationELB"
  metric_name         = "UnHealthyHostCount"
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 2
  threshold           = 0
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  dimensions          = local.target_dimensions[each.key]
}

# No task answers at all (KonnichiwaDown for every task): the load balancer answers 503 itself.
resource "aws_cloudwatch_metric_alarm" "no_healthy_task" {
  for_each            = local.roles
  alarm_name          = "${local.name}-${each.key}-no-healthy-task"
  alarm_description   = "Konnichiwa ${each.key}: no healthy task behind the load balancer for 2 minutes"
  namespace           = "AWS/ApplicationELB"
  metric_name         = "HealthyHostCount"
  statistic           = "Minimum"
  period              = 60
  evaluation_periods  = 2
  threshold           = 1
  comparison_operator = "LessThanThreshold"
  treat_missing_data  = "breaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  dimensions          = local.target_dimensions[each.key]
}
