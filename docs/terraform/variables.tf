variable "ami" { type = string }
variable "instance_type" {
  type    = string
  default = "t3.small"
}
variable "subnet_id" { type = string }
variable "hostname" { type = string }

variable "instance_tags" {
  description = "EC2 tags; those named stepssh:KEY become step-ssh host tags KEY=VALUE"
  type        = map(string)
  default     = {}
}

variable "is_bastion" {
  type    = bool
  default = false
}

variable "step_ssh_server" {
  description = "Control plane address, HOST:PORT"
  type        = string
}

variable "step_ssh_fingerprint" {
  description = "CA fingerprint printed by `step-ssh-server init` (SHA256:...)"
  type        = string
}

variable "step_ssh_token" {
  description = "One-time enrollment token from `step-ssh-server token` or `step-ssh-ctl`"
  type        = string
  sensitive   = true
}

variable "step_ssh_pip_spec" {
  description = "What pip installs (a version pin, or a wheel URL on your mirror)"
  type        = string
  default     = "step-ssh==0.1.0"
}
