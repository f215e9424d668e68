"""Tests of the deployment files: the systemd unit, the example config, the DaemonSet."""
