"""A loopback OTLP/HTTP receiver for tests: decodes what arrives at
/v1/logs and /v1/traces with opentelemetry-proto's messages."""
import gzip
import http.server
import threading


def _value(v):
    """An OTLP AnyValue -> its Python value."""
    field = v.WhichOneof("value")
    return getattr(v, field) if field else None


def attrs(kvs):
    return {kv.key: _value(kv.value) for kv in kvs}


class Receiver:
    """logs: [(resource attrs, LogRecord)]; spans: [(resource attrs, Span)]."""

    def __init__(self, status=200):
        self.status = status
        self.logs, self.spans, self.requests = [], [], 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.take(self.path, body)
                self.send_response(receiver.status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def take(self, path, body):
        from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
        with self.lock:
            self.requests += 1
            if path == "/v1/logs":
                req = ExportLogsServiceRequest.FromString(body)
                for rl in req.resource_logs:
                    for sl in rl.scope_logs:
                        self.logs += [(attrs(rl.resource.attributes), r) for r in sl.log_records]
            elif path == "/v1/traces":
                req = ExportTraceServiceRequest.FromString(body)
                for rs in req.resource_spans:
                    for ss in rs.scope_spans:
                        self.spans += [(attrs(rs.resource.attributes), s) for s in ss.spans]

    def close(self):
        self.server.shutdown()
        self.server.server_close()
