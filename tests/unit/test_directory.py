"""The network directory: parsing, validation with file:line, and routing."""

from pathlib import Path

import pytest

from gateway.directory import CallType, parse_directory
from gateway.errors import ConfigError, NotFound
from gateway.tomlconf import TomlFile

GOOD = """\
network = "se.psn"
clearance_levels = ["NPPV1", "NPPV2", "SC"]
roles = ["investigator"]

[forces.thames-valley]
name = "Thames Valley Police"
ca = "pki/tv/ca.pem"
crl = "pki/tv/crl.pem"
peer_address = "127.0.0.1:7441"
clients = ["analyst-desk"]

[forces.surrey]
ca = "pki/surrey/ca.pem"
peer_address = "[::1]:7443"

[units.serocu]
name = "SEROCU"

[units.tvp-cid]
force = "thames-valley"

[applications.intel-search]
host = "thames-valley"
min_clearance = "SC"
[applications.intel-search.services."psn.demo.intel.v1.IntelligenceSearch"]
Search = "unary"
StreamMatches = "server_stream"
"""


def load(text: str):  # type: ignore[no-untyped-def]
    return parse_directory(TomlFile.parse(text.encode(), Path("/etc/psn/directory.toml")))


def test_parses_and_routes() -> None:
    d = load(GOOD)
    assert d.network == "se.psn"
    tv = d.forces["thames-valley"]
    assert tv.trust_domain == "thames-valley.se.psn"
    assert tv.gateway_spiffe_id == "spiffe://thames-valley.se.psn/gateway"
    assert tv.ca_path == Path("/etc/psn/pki/tv/ca.pem")
    assert d.forces["surrey"].crl_path is None
    assert d.units["serocu"].force is None and d.units["tvp-cid"].force == "thames-valley"
    route = d.route("/psn.demo.intel.v1.IntelligenceSearch/StreamMatches")
    assert route.host == "thames-valley"
    assert route.method.call_type is CallType.SERVER_STREAM
    assert d.applications["intel-search"].services == ("psn.demo.intel.v1.IntelligenceSearch",)
    assert d.clearance_rank("SC") > d.clearance_rank("NPPV2")
    assert d.clearance_rank("TOP") == -1


@pytest.mark.parametrize(
    "method",
    ["/psn.demo.intel.v1.IntelligenceSearch/Delete", "/other.Service/Search", "", "/", "garbage"],
)
def test_unknown_methods_are_not_found(method: str) -> None:
    with pytest.raises(NotFound):
        load(GOOD).route(method)


@pytest.mark.parametrize(
    ("old", "new", "line", "field"),
    [
        ('host = "thames-valley"', 'host = "kent"', 23, "applications.intel-search.host"),
        ('min_clearance = "SC"', 'min_clearance = "TS"', 24, "applications.intel-search.min_clearance"),
        (
            'Search = "unary"',
            'Search = "unry"',
            26,
            "applications.intel-search.services.psn.demo.intel.v1.IntelligenceSearch.Search",
        ),
        ('peer_address = "[::1]:7443"', 'peer_address = "127.0.0.1:7441"', 14, "forces.surrey.peer_address"),
        ('peer_address = "[::1]:7443"', 'peer_address = "nowhere"', 14, "forces.surrey.peer_address"),
        ('force = "thames-valley"', 'force = "kent"', 20, "units.tvp-cid.force"),
        ("[forces.surrey]", "[forces.Surrey]", 12, "forces.Surrey"),
        ('network = "se.psn"', 'network = "SE PSN"', 1, "network"),
        ('clients = ["analyst-desk"]', 'clients = ["Analyst Desk"]', 10, "forces.thames-valley.clients"),
        ('name = "SEROCU"', 'nmae = "SEROCU"', 17, "units.serocu.nmae"),
    ],
)
def test_errors_name_line_and_field(old: str, new: str, line: int, field: str) -> None:
    assert old in GOOD
    with pytest.raises(ConfigError) as err:
        load(GOOD.replace(old, new, 1))
    assert err.value.line == line, str(err.value)
    assert err.value.field == field
    assert str(err.value).startswith(f"/etc/psn/directory.toml:{line}: {field}: ")


def test_a_service_belongs_to_one_application() -> None:
    twice = (
        GOOD
        + """
[applications.copy]
host = "surrey"
min_clearance = "SC"
[applications.copy.services."psn.demo.intel.v1.IntelligenceSearch"]
Search = "unary"
"""
    )
    with pytest.raises(ConfigError, match="already belongs to application 'intel-search'"):
        load(twice)
