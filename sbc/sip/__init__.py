"""Sans-I/O SIP core: messages, URIs, SDP, transactions, dialogs, digest auth."""
