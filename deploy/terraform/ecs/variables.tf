variable "region" {
  type        = string
  description = "AWS region; Tokyo by default, where the users are."
  default     = "ap-northeast-1"

  validation {
    condition     = can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]$", var.region))
    error_message = "region must look like ap-northeast-1."
  }
}

variable "environment" {
  type        = string
  description = "Deployment stage: the service's ENVIRONMENT and part of every resource name."
  default     = "prod"

  validation {
    condition     = contains(["qa", "prod"], var.environment)
    error_message = "environment must be qa or prod (dev is the embedded local stack)."
  }
}

variable "vpc_cidr" {
  type        = string
  description = "CIDR block of the VPC; split into 3 public and 3 private subnets."
  default     = "10.40.0.0/16"

  validation {
    condition     = can(cidrnetmask(var.vpc_cidr)) && tonumber(split("/", var.vpc_cidr)[1]) <= 20
    error_message = "vpc_cidr must be a valid IPv4 CIDR block of /20 or larger."
  }
}

variable "availability_zone_ids" {
  type        = list(string)
  description = "The 3 zone IDs (not names) the subnets use; set them with region. Tokyo's default leaves out apne1-az3, closed to new subnets in most accounts."
  default     = ["apne1-az1", "apne1-az2", "apne1-az4"]

  validation {
    condition     = length(distinct(var.availability_zone_ids)) == 3 && alltrue([for id in var.availability_zone_ids : can(regex("^[a-z]+[0-9]+-az[0-9]+$", id))])
    error_message = "availability_zone_ids must be 3 distinct zone IDs such as apne1-az1."
  }
}

variable "domain_name" {
  type        = string
  description = "Host name the ALB serves (a DNS record pointing at the ALB is yours to create)."

  validation {
    condition     = can(regex("^([a-z0-9-]+\\.)+[a-z]{2,}$", var.domain_name))
    error_message = "domain_name must be a DNS name such as konnichiwa.example.jp."
  }
}

variable "certificate_arn" {
  type        = string
  description = "ARN of the ACM certificate for domain_name, in the same region."

  validation {
    condition     = can(regex("^arn:aws:acm:[a-z0-9-]+:[0-9]{12}:certificate/.+$", var.certificate_arn))
    error_message = "certificate_arn must be an ACM certificate ARN."
  }
}

variable "image_tag" {
  type        = string
  description = "Tag of the image in the ECR repository for the first deployment (CI rolls later ones)."
  default     = "initial"

  validation {
    condition     = can(regex("^[A-Za-z0-9_.-]{1,128}$", var.image_tag))
    error_message = "image_tag must be a valid Docker tag."
  }
}

variable "desired_count" {
  type        = number
  description = "Tasks per service at start (also the autoscaling minimum)."
  default     = 2

  validation {
    condition     = var.desired_count >= 2
    error_message = "desired_count must be at least 2 so a task can fail without an outage."
  }
}

variable "max_count" {
  type        = number
  description = "Most tasks autoscaling may run per service."
  default     = 10

  validation {
    condition     = var.max_count >= 2 && var.max_count <= 100
    error_message = "max_count must be from 2 to 100."
  }
}

variable "task_cpu" {
  type        = number
  description = "CPU units per task (1024 = 1 vCPU)."
  default     = 1024

  validation {
    condition     = contains([256, 512, 1024, 2048, 4096], var.task_cpu)
    error_message = "task_cpu must be a Fargate size: 256, 512, 1024, 2048 or 4096."
  }
}

variable "task_memory" {
  type        = number
  description = "Memory per task in MiB."
  default     = 2048

  validation {
    condition     = var.task_memory >= 512 && var.task_memory <= 30720
    error_message = "task_memory must be from 512 to 30720 MiB."
  }
}

variable "workers" {
  type        = number
  description = "Worker processes per task (WORKERS): one per vCPU."
  default     = 1

  validation {
    condition     = var.workers >= 1 && var.workers <= 16
    error_message = "workers must be from 1 to 16."
  }
}

variable "log_level" {
  type        = string
  description = "The service's LOG_LEVEL."
  default     = "INFO"

  validation {
    condition     = contains(["DEBUG", "INFO", "WARNING", "ERROR"], var.log_level)
    error_message = "log_level must be DEBUG, INFO, WARNING or ERROR."
  }
}

variable "max_body_bytes" {
  type        = number
  description = "Largest request body the service accepts (MAX_BODY_BYTES)."
  default     = 65536

  validation {
    condition     = var.max_body_bytes >= 1024 && var.max_body_bytes <= 16777216
    error_message = "max_body_bytes must be from 1024 to 16777216."
  }
}

variable "log_retention_days" {
  type        = number
  description = "Days CloudWatch keeps the service's logs."
  default     = 365

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be a value CloudWatch Logs accepts."
  }
}

variable "db_instance_class" {
  type        = string
  description = "RDS instance class for Postgres."
  default     = "db.t4g.medium"

  validation {
    condition     = can(regex("^db\\.", var.db_instance_class))
    error_message = "db_instance_class must be an RDS class such as db.t4g.medium."
  }
}

variable "cache_node_type" {
  type        = string
  description = "ElastiCache node type for Valkey."
  default     = "cache.t4g.small"

  validation {
    condition     = can(regex("^cache\\.", var.cache_node_type))
    error_message = "cache_node_type must be an ElastiCache node type such as cache.t4g.small."
  }
}

variable "alarm_topic_arn" {
  type        = string
  description = "SNS topic every CloudWatch alarm notifies; empty for no notification."
  default     = ""

  validation {
    condition     = var.alarm_topic_arn == "" || can(regex("^arn:aws:sns:", var.alarm_topic_arn))
    error_message = "alarm_topic_arn must be empty or an SNS topic ARN."
  }
}

variable "github_repository" {
  type        = string
  description = "owner/name of the GitHub repository whose main branch may deploy (OIDC)."

  validation {
    condition     = can(regex("^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$", var.github_repository))
    error_message = "github_repository must be owner/name."
  }
}

variable "eks_oidc_provider_arn" {
  type        = string
  description = "For deploy/kubernetes: the EKS cluster's IAM OIDC provider ARN; creates one IRSA role per service role. Empty: none."
  default     = ""

  validation {
    condition     = var.eks_oidc_provider_arn == "" || can(regex("^arn:aws:iam::[0-9]{12}:oidc-provider/.+$", var.eks_oidc_provider_arn))
    error_message = "eks_oidc_provider_arn must be empty or an IAM OIDC provider ARN."
  }
}

variable "waf_requests_per_minute" {
  type        = number
  description = "Requests one client address may send in a minute before WAF answers it 429 for a while (coarse: the service sets the quotas per key)."
  default     = 12000

  validation {
    condition     = var.waf_requests_per_minute >= 1000 && var.waf_requests_per_minute <= 2000000000 && floor(var.waf_requests_per_minute) == var.waf_requests_per_minute
    error_message = "waf_requests_per_minute must be a whole number from 1000 to 2000000000."
  }
}
