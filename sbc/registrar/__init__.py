"""The embedded registrar: REGISTER handling, the location service, the users table.

* :mod:`sbc.registrar.registrar`: :class:`Registrar` processes REGISTER (RFC 3261
  10.3) and checks digest credentials of other requests; sans-I/O.
* :mod:`sbc.registrar.location`: :class:`LocationService`, the bindings by AOR
  (what calls to registered users are routed and forked to).
* :mod:`sbc.registrar.credentials`: :class:`SqliteCredentials` (HA1 values only) and
  :class:`StaticCredentials` behind the :class:`CredentialBackend` protocol.
* :mod:`sbc.registrar.cli`: the ``sbc user add|list|remove|passwd`` commands.
"""

from sbc.registrar.credentials import (
    CredentialBackend,
    CredentialError,
    CredentialStoreError,
    SqliteCredentials,
    StaticCredentials,
)
from sbc.registrar.location import Binding, LocationChange, LocationService
from sbc.registrar.registrar import (
    AuthCheck,
    AuthFailure,
    RegisterResult,
    Registrar,
    RegistrarPolicy,
)

__all__ = [
    "AuthCheck",
    "AuthFailure",
    "Binding",
    "CredentialBackend",
    "CredentialError",
    "CredentialStoreError",
    "LocationChange",
    "LocationService",
    "RegisterResult",
    "Registrar",
    "RegistrarPolicy",
    "SqliteCredentials",
    "StaticCredentials",
]
