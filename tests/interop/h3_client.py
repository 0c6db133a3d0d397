"""An independent HTTP/3 client (aioquic) for limen's interop test.

    python h3_client.py HOST:PORT SNI CA_FILE PATH [POST_BYTES]

Connects over QUIC to HOST:PORT with SNI, trusting CA_FILE, sends one request for PATH (a POST of
POST_BYTES bytes when given), and prints `status=N`, `bytes=N` and each response header as
`header:NAME=VALUE` on stdout. Exits non-zero when the exchange fails.
"""

import asyncio
import ssl
import sys

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.done = asyncio.get_event_loop().create_future()
        self.headers = []
        self.body = 0

    def quic_event_received(self, event):
        for e in self.h3.handle_event(event):
            if isinstance(e, HeadersReceived):
                self.headers.extend(e.headers)
                if e.stream_ended and not self.done.done():
                    self.done.set_result(True)
            elif isinstance(e, DataReceived):
                self.body += len(e.data)
                if e.stream_ended and not self.done.done():
                    self.done.set_result(True)

    def request(self, authority, path, body):
        stream = self._quic.get_next_available_stream_id()
        method = b"POST" if body is not None else b"GET"
        self.h3.send_headers(
            stream,
            [
                (b":method", method),
                (b":scheme", b"https"),
                (b":authority", authority.encode()),
                (b":path", path.encode()),
                (b"user-agent", b"aioquic"),
            ],
            end_stream=body is None,
        )
        if body is not None:
            self.h3.send_data(stream, body, end_stream=True)
        self.transmit()


async def main():
    addr, sni, ca, path = sys.argv[1:5]
    post = int(sys.argv[5]) if len(sys.argv) > 5 else None
    host, port = addr.rsplit(":", 1)
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=sni)
    config.load_verify_locations(ca)
    config.verify_mode = ssl.CERT_REQUIRED
    async with connect(host, int(port), configuration=config, create_protocol=Client) as c:
        c.request(sni, path, b"p" * post if post is not None else None)
        await asyncio.wait_for(c.done, 20)
        for name, value in c.headers:
            if name == b":status":
                print(f"status={value.decode()}")
            else:
                print(f"header:{name.decode()}={value.decode()}")
        print(f"bytes={c.body}")


asyncio.run(main())
