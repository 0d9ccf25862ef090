"""centripy: a Centrifugo v5 compatible real-time messaging server.

The four layers live in the repository's top-level folders and are installed under this one
namespace (`centripy/engine` and its siblings are links to them in a source checkout; a
wheel holds real copies): `centripy.engine` (protocol, config, channels, auth, recovery,
node orchestration, the API executor and the contracts), `centripy.storage` (back ends of
those contracts), `centripy.actors` (connection and channel actors on the event loop) and
`centripy.transports` (Tornado handlers, the lean HTTP/WebSocket path). What belongs to no
layer is this package's own: `centripy.cli` (the command line), `centripy.server` (the one
composition root) and `centripy.consumers` (the Kafka and outbox consumers).
"""
