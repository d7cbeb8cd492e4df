"""Where the S3 connection settings come from: endpoint, region and credentials.

Nothing is hard-coded; the standard places are read: AWS_ENDPOINT_URL (or
AWS_ENDPOINT_URL_S3), AWS_REGION / AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE with ~/.aws/config and
~/.aws/credentials (AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE), and obstore's own chain
(web identity, ECS/EKS container credentials, instance metadata). With boto3 importable,
a profile's credentials come from botocore (SSO, assume-role, credential_process...);
without it, static keys of the profile are read from the files. An http:// endpoint is
allowed (MinIO on a private network, the tests' moto server); requests are path-style
unless AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true.

`aws_setup()` is called once per store (graft.storage.stores), when a bucket is first used
under a given AWS_* environment; it also records where the credentials came from, so that an
"access denied" can say which ones graft used.
"""

from __future__ import annotations

import configparser
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone


@dataclass(frozen=True)
class AwsSetup:
    """Where the connection settings came from (for the store and for error messages)."""

    config: dict
    credential_provider: object
    endpoint: str | None
    region: str | None
    credentials_from: str

    def where(self) -> str:
        if self.endpoint:
            return f"endpoint {self.endpoint}"
        return f"AWS S3, region {self.region or 'us-east-1 (the default)'}"


def _profile_name() -> str:
    return os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or "default"


def _read_ini(path: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser()
    try:
        parser.read(os.path.expanduser(path), encoding="utf-8")
    except (configparser.Error, OSError, UnicodeDecodeError):
        pass
    return parser


def _profile_values() -> tuple[dict, dict]:
    """The profile's section of ~/.aws/config and of ~/.aws/credentials (either may be empty)."""
    profile = _profile_name()
    config = _read_ini(os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"))
    creds = _read_ini(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"))
    conf_section = "default" if profile == "default" else f"profile {profile}"
    conf = dict(config.items(conf_section)) if config.has_section(conf_section) else (
        dict(config.items(profile)) if config.has_section(profile) else {})
    cred = dict(creds.items(profile)) if creds.has_section(profile) else {}
    return conf, cred


def _nested(value: str | None, name: str) -> str | None:
    """`name = x` inside a nested config block (`s3 =\\n  endpoint_url = x`)."""
    for line in (value or "").splitlines():
        key, sep, val = line.partition("=")
        if sep and key.strip() == name:
            return val.strip()
    return None


class _BotoCredentials:
    """obstore credential provider over a botocore credential chain (refreshable credentials)."""

    def __init__(self, credentials):
        self.credentials = credentials

    def __call__(self) -> dict:
        frozen = self.credentials.get_frozen_credentials()
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key,
                "token": frozen.token,
                "expires_at": datetime.now(timezone.utc) + timedelta(minutes=5)}


def aws_setup() -> AwsSetup:
    """The endpoint, region and credentials of the current AWS_* environment and profile.

    `config` holds only what obstore would not find by itself in the environment (values from
    the profile's files); `credential_provider` is botocore's chain when it has credentials.
    """
    env = os.environ
    conf, cred = _profile_values()
    config: dict = {}
    ignore_configured = env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true"
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or env.get("AWS_ENDPOINT")
    if not endpoint and not ignore_configured:
        endpoint = _nested(conf.get("s3"), "endpoint_url") or conf.get("endpoint_url")
        if endpoint:
            config["endpoint"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if not region and conf.get("region"):
        region = config["region"] = conf["region"]
    provider = None
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        source = "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment"  # obstore reads them itself
    else:
        source = ""
        try:
            import botocore.session
        except ImportError:
            botocore = None
        if botocore is not None:
            try:
                session = botocore.session.Session(profile=env.get("AWS_PROFILE") or None)
                credentials = session.get_credentials()
            except Exception:  # noqa: BLE001 - a broken profile: fall through to the files
                credentials = None
            if credentials is not None:
                provider = _BotoCredentials(credentials)
                source = f"botocore's chain (profile {_profile_name()!r})"
        if provider is None:
            keys = cred if cred.get("aws_access_key_id") else conf
            if keys.get("aws_access_key_id") and keys.get("aws_secret_access_key"):
                config["access_key_id"] = keys["aws_access_key_id"]
                config["secret_access_key"] = keys["aws_secret_access_key"]
                if keys.get("aws_session_token"):
                    config["session_token"] = keys["aws_session_token"]
                source = f"profile {_profile_name()!r} of the AWS credential files"
        if not source:
            source = ("no credentials found (AWS_ACCESS_KEY_ID, AWS_PROFILE, ~/.aws/credentials);"
                      " obstore's chain: web identity, container, instance metadata")
    return AwsSetup(config, provider, endpoint, region, source)
