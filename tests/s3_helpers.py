"""A real S3 protocol server on 127.0.0.1 (moto's), behind a TCP proxy the tests can cut or slow."""

import socket
import threading
import time


class Proxy:
    """Forwards 127.0.0.1:port to the server. mode: 'pass'; 'cut' (connections are refused: the
    server went away); throttle: client->server bytes per second (None: unlimited)."""

    def __init__(self, target_port):
        self.target = ("127.0.0.1", target_port)
        self.mode, self.throttle = "pass", None
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self):
        self.mode = "cut"
        for c in list(self._conns):  # open connections die too
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass

    def restore(self):
        self.mode = "pass"

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.mode == "cut":
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src, dst, upload):
        try:
            while True:
                data = src.recv(16384)
                if not data or self.mode == "cut":
                    break
                if upload and self.throttle:
                    time.sleep(len(data) / self.throttle)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass


class S3:
    """moto's S3 server and a proxy in front; `env` is what a process needs to reach it."""

    def __init__(self, bucket="ckpt"):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.proxy = Proxy(self.server.get_host_and_port()[1])
        self.bucket = bucket
        self.env = {"AWS_ENDPOINT_URL": self.proxy.url, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_MAX_ATTEMPTS": "2", "AWS_RETRY_MODE": "standard"}
        self.client().create_bucket(Bucket=bucket)

    def client(self):
        import boto3

        host, port = self.server.get_host_and_port()
        return boto3.client("s3", endpoint_url=f"http://{host}:{port}", aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def keys(self, prefix=""):
        out, token = [], None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            resp = self.client().list_objects_v2(**kw)
            out += [o["Key"] for o in resp.get("Contents", [])]
            if not resp.get("IsTruncated"):
                return sorted(out)
            token = resp["NextContinuationToken"]

    def get(self, key):
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def put(self, key, data):
        self.client().put_object(Bucket=self.bucket, Key=key, Body=data)

    def delete(self, key):
        self.client().delete_object(Bucket=self.bucket, Key=key)

    def close(self):
        self.proxy.sock.close()
        self.server.stop()
