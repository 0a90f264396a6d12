"""Who a request is, from its fields (SPEC section 11): the keys of the ``identity`` section
loaded once per config, and the one look-up a request makes when its route needs it.

The files (JWKS, API keys) are read with the config, at load and on reload: a file that
does not parse is a config error naming its field (a reload keeps the previous keys), a
missing one a warning (its credentials then never verify).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from multidict import istr

from gateway.core.gcra import Rate
from gateway.identity.api_keys import ApiKeyError, ApiKeys
from gateway.identity.tokens import JwksError, TokenVerifier, Verified, bearer_token, load_jwks

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from multidict import CIMultiDict, CIMultiDictProxy

    from gateway.config.errors import Problem
    from gateway.config.models import Config, Identity
    from gateway.core.failure_budget import FailureBudget

    Fields = CIMultiDict[str] | CIMultiDictProxy[str]

__all__ = [
    "NO_IDENTITY",
    "IdentityKeys",
    "RequestIdentity",
    "failure_rate",
    "identity_files",
    "load_identity",
]

MAX_FILE_BYTES = 1 << 20
_AUTHORIZATION: Final = istr("Authorization")  # (an istr is not case-folded on every lookup)


@dataclass(frozen=True, slots=True)
class RequestIdentity:
    """What a request's credentials proved: the claims of a verified token and the id of a
    listed API key (each None when absent or invalid)."""

    claims: Mapping[str, Any] | None = None
    api_key: str | None = None
    plan: str | None = None
    # a credential was sent that did not verify (beside the valid one, if any)
    refused: bool = False
    # the rate-limit checks of each route whose policies are all keyed by this identity
    # (decisions.policy_checks fills it): set on an identity kept with its verified token,
    # so a repeated token finds them made; None on the others
    # (read only: shared by the requests that carry the token)
    # (typed by decisions.RouteChecks: identity sits below the pipeline and knows no route)
    route_checks: dict[str, Any] | None = field(default=None, compare=False)
    # the access log's ``identity``: ``jwt:<sub>`` or ``api_key:<id>`` (made once)
    label: str | None = field(init=False, compare=False)

    def __post_init__(self) -> None:
        label = None
        if self.claims is not None:
            sub = self.claims.get("sub")
            label = f"jwt:{sub}" if isinstance(sub, str) else "jwt:"
        elif self.api_key is not None:
            label = "api_key:" + self.api_key
        object.__setattr__(self, "label", label)


NO_IDENTITY: Final = RequestIdentity()


class IdentityKeys:
    """The verifier and the API keys of one loaded config."""

    __slots__ = ("api_key_header", "api_keys", "plan_claim", "verifier")

    def __init__(
        self,
        verifier: TokenVerifier | None,
        api_keys: ApiKeys | None,
        api_key_header: str | None,
        plan_claim: str | None,
    ) -> None:
        self.verifier = verifier
        self.api_keys = api_keys
        # an istr: a plain str is case-folded anew on every lookup
        self.api_key_header = istr(api_key_header) if api_key_header is not None else None
        self.plan_claim = plan_claim

    def identify(
        self,
        headers: Fields,
        *,
        client: str | None = None,
        failures: FailureBudget | None = None,
        spend: bool = True,
        record: Callable[[str, str], None] | None = None,
    ) -> RequestIdentity:
        """Verify the request's credentials (a bearer token, an API key).

        ``client`` and ``failures``: the client's key and the budget its failed token
        checks spend (``spend``; see :meth:`TokenVerifier.verify`); ``record(kind,
        result)`` is told the outcome of each credential (``jwt``/``api_key``; ``valid``
        or why not).
        """
        verified: Verified | None = None
        refused = False
        if self.verifier is not None:
            token = bearer_token(_single(headers, _AUTHORIZATION))
            if token is not None:
                outcome = self.verifier.verify(token, client=client, failures=failures, spend=spend)
                refused = not isinstance(outcome, Verified)
                if isinstance(outcome, Verified):
                    verified = outcome
                    if record is not None:
                        record("jwt", "valid")
                elif record is not None:
                    record("jwt", outcome.reason)
        found = None
        if self.api_keys is not None and self.api_key_header is not None:
            raw = _single(headers, self.api_key_header)
            if raw is not None:
                found = self.api_keys.lookup(raw)
                refused = refused or found is None
                if record is not None:
                    record("api_key", "valid" if found is not None else "unknown")
        if verified is None:
            if found is None:
                return NO_IDENTITY
            return RequestIdentity(None, found.id, found.plan, refused=refused)
        ident: RequestIdentity | None = verified.memo
        if ident is None:  # made once per verified token, then kept with it in the cache
            plan = None
            if self.plan_claim is not None:
                value = verified.claims.get(self.plan_claim)
                plan = value if isinstance(value, str) else None
            ident = verified.memo = RequestIdentity(verified.claims, None, plan, route_checks={})
        if found is None and not refused:
            return ident
        return RequestIdentity(
            ident.claims,
            None if found is None else found.id,
            ident.plan or (None if found is None else found.plan),
            refused=refused,
        )


def _single(headers: Fields, name: str) -> str | None:
    """The field's value when it is given once; None when absent or given more than once:
    the upstream may read another one than the gateway verified (the last, or all joined),
    so a valid credential of one's own would carry a forged one past ``auth``."""
    values = headers.getall(name, ())
    return values[0] if len(values) == 1 else None


def _read(path: str) -> str | None:
    """The text of a file, or None when it does not exist."""
    try:
        with open(path, "rb") as f:  # noqa: PTH123
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        msg = f"cannot read {path}: {exc.strerror}"
        raise ValueError(msg) from None
    if len(raw) > MAX_FILE_BYTES:
        msg = f"{path} is larger than 1 MiB: refused"
        raise ValueError(msg)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        msg = f"{path} is not UTF-8 text"
        raise ValueError(msg) from None


def failure_rate(section: Identity) -> Rate | None:
    """The budget of failed token checks per client address (None: no budget)."""
    jwt_cfg = section.jwt
    if jwt_cfg is None or jwt_cfg.max_failed_per_ip is None:
        return None
    most = jwt_cfg.max_failed_per_ip
    return Rate(most, float(jwt_cfg.failed_window_s), most)


def identity_files(cfg: Config) -> list[str]:
    """The paths of the files the ``identity`` section names (re-read on reload)."""
    section = cfg.identity
    paths = []
    if section.jwt is not None and section.jwt.jwks_file is not None:
        paths.append(section.jwt.jwks_file)
    if section.api_keys is not None and section.api_keys.file is not None:
        paths.append(section.api_keys.file)
    return paths


def load_identity(
    section: Identity, environ: Mapping[str, str]
) -> tuple[IdentityKeys | None, list[Problem], list[Problem]]:
    """The keys of the ``identity`` section: (keys, errors, warnings)."""
    # the config package imports this module while it loads
    from gateway.config.errors import Problem  # noqa: PLC0415

    errors: list[Problem] = []
    warnings: list[Problem] = []
    verifier = api_keys = None
    jwt_cfg, keys_cfg = section.jwt, section.api_keys
    if jwt_cfg is None and keys_cfg is None:
        return None, errors, warnings
    if jwt_cfg is not None:
        jwks: dict[str | None, list[Any]] = {}
        if jwt_cfg.jwks_file is not None:
            where = "identity.jwt.jwks_file"
            try:
                text = _read(jwt_cfg.jwks_file)
                if text is None:
                    warnings.append(
                        Problem(where, f"{jwt_cfg.jwks_file} does not exist: no token verifies")
                    )
                else:
                    jwks = load_jwks(text)
            except (ValueError, JwksError) as exc:
                errors.append(Problem(where, f"{jwt_cfg.jwks_file}: {exc}"))
        secret = None
        if jwt_cfg.hs256_secret_env is not None:
            value = environ.get(jwt_cfg.hs256_secret_env, "")
            where = "identity.jwt.hs256_secret_env"
            if not value:
                warnings.append(
                    Problem(
                        where,
                        f"environment variable {jwt_cfg.hs256_secret_env} is not set:"
                        " no HS256 token verifies",
                    )
                )
            else:
                secret = value.encode()
                if len(secret) < 32:
                    warnings.append(
                        Problem(
                            where,
                            f"the HS256 secret is {len(secret)} bytes: 32 or more are needed"
                            " (RFC 7518 3.2)",
                            risky=True,
                        )
                    )
        verifier = TokenVerifier(
            keys=jwks,
            hs256_secret=secret,
            issuer=jwt_cfg.issuer,
            audience=jwt_cfg.audience,
            leeway_s=jwt_cfg.leeway_s,
        )
    if keys_cfg is not None and keys_cfg.file is not None:
        where = "identity.api_keys.file"
        try:
            text = _read(keys_cfg.file)
            if text is None:
                warnings.append(Problem(where, f"{keys_cfg.file} does not exist: no key is valid"))
                api_keys = ApiKeys([])
            else:
                api_keys = ApiKeys.from_text(text)
        except (ValueError, ApiKeyError) as exc:
            errors.append(Problem(where, f"{keys_cfg.file}: {exc}"))
    elif keys_cfg is not None:
        api_keys = ApiKeys([])
    return (
        IdentityKeys(
            verifier,
            api_keys,
            keys_cfg.header if keys_cfg is not None else None,
            jwt_cfg.plan_claim if jwt_cfg is not None else None,
        ),
        errors,
        warnings,
    )
