"""The HTTP service's parts: errors, request parsing, auth, batching, metrics and the API description.

``flask_http_server.py`` wires them into the Flask app.
"""
