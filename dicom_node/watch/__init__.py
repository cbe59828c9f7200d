"""Watch: what admins use: the dashboard, API and metrics, the timeline, and the command line."""
