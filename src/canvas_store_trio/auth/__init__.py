"""Standard token checks to use as an ``authorize`` hook: JWTs, with PyJWT."""

from ._jwt import JWTAuthorizer as JWTAuthorizer
from ._jwt import TokenRefused as TokenRefused
