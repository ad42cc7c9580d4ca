"""The tests' S3 server: expo_dist.testing.s3server (SeaweedFS on 127.0.0.1), re-exported under its old name."""

from expo_dist.testing.s3server import (  # noqa: F401
    ADMIN,
    READER,
    S3Server,
    _free_ports,
    _wait_writable,
    download_prefix,
    uploads,
    weed_binary,
    weed_server,
)
