# Example: enrol new EC2 instances with step-ssh at first boot.
#
# The instance's tags become step-ssh host tags (prefix "stepssh:" stripped), so
# grants like "group ops, tags env=prod role=web" apply to it automatically.
# The enrollment token is a sensitive variable: it never appears in plans or
# state outputs, and it is one-time, so a leaked old token is useless.

terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = { source = "hashicorp/aws", version = ">= 5.0" }
  }
}

locals {
  # {"stepssh:env" = "prod", "Name" = "web1"} -> {env = "prod"}
  step_ssh_tags = {
    for k, v in var.instance_tags : trimprefix(k, "stepssh:") => v
    if startswith(k, "stepssh:")
  }
  tag_args = join(" ", [for k, v in local.step_ssh_tags : "--tag=${k}=${v}"])
}

resource "aws_instance" "host" {
  ami           = var.ami
  instance_type = var.instance_type
  subnet_id     = var.subnet_id
  tags          = var.instance_tags

  user_data_replace_on_change = false
  user_data = templatefile("${path.module}/cloud-init.yaml.tftpl", {
    server        = var.step_ssh_server
    fingerprint   = var.step_ssh_fingerprint
    token         = var.step_ssh_token
    hostname      = var.hostname
    tag_args      = local.tag_args
    bastion_arg   = var.is_bastion ? "--is-bastion" : ""
    pip_spec      = var.step_ssh_pip_spec
  })
}
