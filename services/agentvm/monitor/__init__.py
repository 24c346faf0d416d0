"""monitor service: events, metrics, audit log and anomaly detection (MonitorService)."""
