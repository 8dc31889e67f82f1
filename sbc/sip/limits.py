"""Hard limits on everything the SIP core reads from the network.

Each limit is a named constant paired with the status a server answers when a
request exceeds it (responses that exceed a limit are dropped, RFC 3261 18.1.2).
Together they bound the memory one message can cost, whatever a peer sends.
"""

from typing import Final

#: RFC 3261 18.1.1: a UDP message may not exceed the path MTU by much; 64 KiB is
#: the datagram ceiling and the most we buffer for one message on a stream.
MAX_MESSAGE_SIZE: Final = 65_535
MAX_MESSAGE_SIZE_STATUS: Final = 513  # Message Too Large

#: The header section (start line and all header fields) of one message.
MAX_HEADER_SECTION: Final = 32_768
MAX_HEADER_SECTION_STATUS: Final = 513

#: One physical or folded header line.
MAX_LINE_LENGTH: Final = 8_192
MAX_LINE_LENGTH_STATUS: Final = 400

#: Header fields in one message (after splitting nothing: one line, one field).
MAX_HEADERS: Final = 256
MAX_HEADERS_STATUS: Final = 400

#: Via values in one message: a path longer than any sane Max-Forwards allows.
MAX_VIA: Final = 70
MAX_VIA_STATUS: Final = 400

#: Message body, as declared by Content-Length.
MAX_BODY_SIZE: Final = 32_768
MAX_BODY_SIZE_STATUS: Final = 413  # Request Entity Too Large

#: The Request-URI.
MAX_URI_LENGTH: Final = 4_096
MAX_URI_LENGTH_STATUS: Final = 414  # Request-URI Too Long

#: Parameters on one URI or one header value.
MAX_PARAMS: Final = 64
MAX_PARAMS_STATUS: Final = 400

#: Values of one list header (Contact, Route, Record-Route ...) in one message.
MAX_LIST_VALUES: Final = 128
MAX_LIST_VALUES_STATUS: Final = 400

#: RFC 5626 4.4.1 / 3.5.1: CRLF keepalives; bytes of whitespace we skip between
#: messages on a stream before we call it garbage.
MAX_KEEPALIVE_RUN: Final = 1_024
