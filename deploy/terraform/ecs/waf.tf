# A coarse rate limit per client address before a flood reaches the tasks; the service sets the
# finer quotas per key and route class. The health checks are never counted, as in the service.
resource "aws_wafv2_web_acl" "main" {
  #checkov:skip=CKV_AWS_192:the service runs no Java, so Log4j lookups cannot reach a JNDI resolver
  name        = local.name
  description = "Konnichiwa: a coarse rate limit per client address"
  scope       = "REGIONAL"

  default_action {
    allow {}
  }

  rule {
    name     = "rate-per-client-address"
    priority = 1

    action {
      block {
        custom_response {
          response_code = 429

          response_header {
            name  = "Retry-After"
            value = "60"
          }
        }
      }
    }

    statement {
      rate_based_statement {
        limit                 = var.waf_requests_per_minute
        evaluation_window_sec = 60
        aggregate_key_type    = "IP"

        scope_down_statement {
          not_statement {
            statement {
              regex_match_statement {
                regex_string = "^/health(/ready)?$"

                field_to_match {
                  uri_path {}
                }

                text_transformation {
                  priority = 0
                  type     = "NONE"
                }
              }
            }
          }
        }
      }
    }

    visibility_config {
      cloudwatch_metrics_enabled = true
      metric_name                = "${local.name}-rate-per-client-address"
      sampled_requests_enabled   = true
    }
  }

  visibility_config {
    cloudwatch_metrics_enabled = true
    metric_name                = local.name
    sampled_requests_enabled   = true
  }
}

resource "aws_wafv2_web_acl_association" "alb" {
  resource_arn = aws_lb.main.arn
  web_acl_arn  = aws_wafv2_web_acl.main.arn
}

# WAF writes only to log groups whose names start with aws-waf-logs-.
resource "aws_cloudwatch_log_group" "waf" {
  name              = "aws-waf-logs-${local.name}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.main.arn
}

resource "aws_wafv2_web_acl_logging_configuration" "main" {
  resource_arn            = aws_wafv2_web_acl.main.arn
  log_destination_configs = [aws_cloudwatch_log_group.waf.arn]

  # The API key headers never reach the logs.
  dynamic "redacted_fields" {
    for_each = ["authorization", "x-api-key", "api-key"]

    content {
      single_header {
        name = redacted_fields.value
      }
    }
  }

  # Only the blocked requests: a flood must not become a flood of log lines.
  logging_filter {
    default_behavior = "DROP"

    filter {
      behavior    = "KEEP"
      requirement = "MEETS_ANY"

      condition {
        action_condition {
          action = "BLOCK"
        }
      }
    }
  }
}
