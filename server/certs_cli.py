"""`cmoe-certs`: make and inspect the federation's CA, SuperLink certificate and site keys.

    cmoe-certs init pki --host coordinator.example.org      # CA + server certificate
    cmoe-certs site pki hospital-a                           # one key pair per site
    cmoe-certs show pki                                      # what is there, days left
    cmoe-certs renew-server pki                              # new server certificate, same CA

File layout, key formats and renewal: see `fedcommon.certs`.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cancermoe.cli.common import run_app
from fedcommon import certs

cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Keys and certificates for a secure CancerMoE-FL federation.")


@cli.command()
def init(
    directory: Path = typer.Argument(..., help="New (or empty) directory for the PKI."),
    hosts: list[str] = typer.Option(..., "--host", help="Name or IP the sites dial; repeat for several."),
    days: int = typer.Option(certs.DEFAULT_SERVER_DAYS, "--days", help="Server certificate validity, days."),
    ca_days: int = typer.Option(certs.DEFAULT_CA_DAYS, "--ca-days", help="CA validity, days."),
) -> None:
    """Create a CA and the SuperLink's TLS certificate."""
    certs.init_pki(directory, hosts, days, ca_days)
    names = ", ".join(certs.describe_pki(directory)["server"]["sans"])
    typer.echo(f"CA certificate      {directory / certs.CA_CERT}  (give to every site)")
    typer.echo(f"CA key              {directory / certs.CA_KEY}  (secret; only renew-server needs it)")
    typer.echo(f"server certificate  {directory / certs.SERVER_CERT}  for {names}, {days} days")
    typer.echo(f"server key          {directory / certs.SERVER_KEY}  (secret)")
    typer.echo(f"next: `cmoe-certs site {directory} SITE` for each site, then `cmoe-server --pki {directory} ...`")


@cli.command()
def site(
    directory: Path = typer.Argument(..., help="PKI directory made by `init`."),
    name: str = typer.Argument(..., help="Site name: letters, digits, '_' and '-'."),
    force: bool = typer.Option(False, "--force", help="Replace the site's existing key."),
) -> None:
    """Create a site's key pair for SuperNode authentication."""
    key_path, pub_path = certs.new_site_key(directory, name, force=force)
    typer.echo(f"site {name}: private key {key_path} (secret), public key {pub_path}")
    typer.echo(f"send site {name}, over a secure channel: {directory / certs.CA_CERT} and {key_path}")
    typer.echo("the site runs:")
    typer.echo(f"  cmoe-client --site={name} --ca {certs.CA_CERT} --key {key_path.name} "
               "--superlink HOST:PORT --bank BANK.h5")
    typer.echo(f"the coordinator registers every {directory / certs.SITES}/*.pub when it starts: "
               f"cmoe-server --pki {directory} ...")


@cli.command("renew-server")
def renew_server(
    directory: Path = typer.Argument(..., help="PKI directory made by `init`."),
    hosts: list[str] = typer.Option(None, "--host", help="Names for the new certificate (default: the current)."),
    days: int = typer.Option(certs.DEFAULT_SERVER_DAYS, "--days", help="Validity, days."),
) -> None:
    """Issue a new server certificate from the same CA (sites keep their files); restart the SuperLink after."""
    path = certs.renew_server_certificate(directory, hosts or None, days)
    typer.echo(f"new server certificate {path}, {days} days; restart cmoe-server to use it")


def format_table(rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _status(entry: dict) -> str:
    return "EXPIRED" if entry["expired"] else "ok"


@cli.command()
def show(
    directory: Path = typer.Argument(..., help="PKI directory made by `init`."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the CA, the server certificate and the site keys, with days left."""
    info = certs.describe_pki(directory)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    ca, server = info["ca"], info["server"]
    server_status = _status(server) if server["signed_by_ca"] else "NOT SIGNED BY CA"
    rows = [
        ["WHAT", "NAME", "DETAILS", "NOT AFTER", "DAYS LEFT", "STATUS"],
        ["CA", ca["subject"], "", ca["not_after"][:10], str(ca["days_left"]), _status(ca)],
        ["server", server["subject"], "SAN " + ",".join(server["sans"]), server["not_after"][:10],
         str(server["days_left"]), server_status],
    ]
    rows += [["site", s["site"], s["fingerprint"], "-", "-", s["curve"]] for s in info["sites"]]
    typer.echo(format_table(rows))


def main(argv: list[str] | None = None) -> None:
    run_app(cli, argv)


if __name__ == "__main__":
    main()
