"""Exception types whose messages are shown to users as-is (no traceback)."""


class FedgenError(Exception):
    """A problem the user can act on: bad input, bad config, a failed site.

    The message names the site, file and problem; the CLI prints it without a
    traceback and exits non-zero.
    """


class InputError(FedgenError):
    """A site's input files (VCF/BCF, samples table) are missing or malformed."""


class ConfigError(FedgenError):
    """The study configuration is invalid."""


class SiteError(FedgenError):
    """A site refused a request, failed, or did not answer."""

    def __init__(self, site: str, message: str) -> None:
        super().__init__(f"site {site}: {message}")
        self.site = site
        self.reason = message
