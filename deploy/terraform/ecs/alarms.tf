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
  target_levels = {
    "latency" = {
      metric       = "TargetResponseTime"
      statistic    = "p95"
      comparison   = "GreaterThanThreshold"
      threshold    = 0.3
      minutes      = 15
      missing_data = "notBreaching"
      meaning      = "p95 of the time to answer above 300 ms"
    }
    "unhealthy-tasks" = {
      metric       = "UnHealthyHostCount"
      statistic    = "Maximum"
      comparison   = "GreaterThanThreshold"
      threshold    = 0
      minutes      = 2
      missing_data = "notBreaching"
      meaning      = "a task failing its readiness check (Redis or Postgres down)"
    }
    "no-healthy-task" = {
      metric       = "HealthyHostCount"
      statistic    = "Minimum"
      comparison   = "LessThanThreshold"
      threshold    = 1
      minutes      = 2
      missing_data = "breaching"
      meaning      = "no healthy task behind the load balancer"
    }
  }
  target_alarms = {
    for pair in setproduct(local.roles, keys(local.target_levels)) :
    "${pair[0]}-${pair[1]}" => merge(local.target_levels[pair[1]], { role = pair[0] })
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

  dynamic "metric_query" {
    for_each = { errors = "HTTPCode_Target_5XX_Count", requests = "RequestCount" }

    content {
      id = metric_query.key

      metric {
        namespace   = "AWS/ApplicationELB"
        metric_name = metric_query.value
        period      = 60
        stat        = "Sum"
        dimensions  = local.target_dimensions[each.value.role]
      }
    }
  }
}

# Per role, on the load balancer's view of the tasks. The latency objective (95 % within 300 ms):
# a CloudWatch alarm has one window, so there is no pair of burn-rate windows; it fires when the
# p95 stayed above 300 ms for 15 minutes. Readiness fails while Redis or Postgres does not answer
# (KonnichiwaDependencyDown), so the load balancer counts the task unhealthy; with no healthy task
# at all (KonnichiwaDown everywhere) it answers 503 itself.
resource "aws_cloudwatch_metric_alarm" "target" {
  for_each            = local.target_alarms
  alarm_name          = "${local.name}-${each.key}"
  alarm_description   = "Konnichiwa ${each.value.role}: ${each.value.meaning} for ${each.value.minutes} minutes"
  namespace           = "AWS/ApplicationELB"
  metric_name         = each.value.metric
  statistic           = startswith(each.value.statistic, "p") ? null : each.value.statistic
  extended_statistic  = startswith(each.value.statistic, "p") ? each.value.statistic : null
  period              = 60
  evaluation_periods  = each.value.minutes
  threshold           = each.value.threshold
  comparison_operator = each.value.comparison
  treat_missing_data  = each.value.missing_data
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  dimensions          = local.target_dimensions[each.value.role]
}
