"""The HTTP worker's parts: ``app`` (routes), ``backend`` (the other workers' sockets), ``metrics``,
``openapi`` (the API's description) and ``static`` (the dashboard: plain HTML, CSS and JavaScript,
no build step, nothing fetched from elsewhere). docs/web.md."""
