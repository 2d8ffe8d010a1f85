variable "region" {
  type        = string
  description = "AWS region; Tokyo by default, where the users are."
  default     = "ap-northeast-1"

  validation {
    condition     = can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]$", var.region))
    error_message = "region must look like ap-northeast-1."
  }
}

variable "deployer_cidr" {
  type        = string
  description = "The only addresses that may reach the host, e.g. your IP as 203.0.113.7/32."

  validation {
    condition     = can(cidrnetmask(var.deployer_cidr)) && var.deployer_cidr != "0.0.0.0/0"
    error_message = "deployer_cidr must be a CIDR block narrower than the whole internet."
  }
}

variable "instance_type" {
  type        = string
  description = "EC2 instance type for the whole compose stack."
  default     = "t3.small"

  validation {
    condition     = can(regex("^[a-z][a-z0-9]*\\.[a-z0-9]+$", var.instance_type))
    error_message = "instance_type must be an EC2 type such as t3.small."
  }
}

variable "repository_url" {
  type        = string
  description = "Git URL of the Konnichiwa repository the host clones and runs with docker compose."

  validation {
    condition     = can(regex("^https://", var.repository_url))
    error_message = "repository_url must be an https:// Git URL."
  }
}

variable "git_ref" {
  type        = string
  description = "Branch or tag of the repository to run."
  default     = "main"

  validation {
    condition     = can(regex("^[A-Za-z0-9_./-]+$", var.git_ref))
    error_message = "git_ref must be a branch or tag name."
  }
}
