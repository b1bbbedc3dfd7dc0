"""The HTTP side of the service: settings, request schemas, extra routes, job progress, and the
mapping from slapgen's errors to status codes and one JSON error shape."""
