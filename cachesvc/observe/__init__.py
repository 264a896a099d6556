"""Running as a system service: systemd's socket passing and notifications, the log observers, SIGHUP."""
