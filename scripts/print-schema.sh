#!/usr/bin/env bash
# Regenerates ledger-core/src/schema.rs with `diesel print-schema` against a throwaway
# PostgreSQL migrated with this repository's migrations. Needs diesel_cli:
#   cargo install diesel_cli --no-default-features --features postgres
set -euo pipefail
cd "$(dirname "$0")/.."
bindir="$(pg_config --bindir 2>/dev/null || ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
base="$(mktemp -d /tmp/ledger-schema-XXXXXX)"
as_pg=()
if [ "$(id -u)" = 0 ]; then chown postgres "$base"; as_pg=(runuser -u postgres --); fi
cleanup() { "${as_pg[@]}" "$bindir/pg_ctl" -D "$base/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$base"; }
trap cleanup EXIT
"${as_pg[@]}" "$bindir/initdb" -D "$base/data" -U postgres --auth=trust --locale=C --no-sync >/dev/null
"${as_pg[@]}" "$bindir/pg_ctl" -D "$base/data" -l "$base/log" -w \
    -o "-c listen_addresses='' -c unix_socket_directories='$base'" start >/dev/null
export DATABASE_URL="postgresql:///ledger?host=$base&user=postgres"
# `diesel setup` would add its own initial-setup migration; create the database by hand.
"${as_pg[@]}" "$bindir/psql" -h "$base" -U postgres -qc "CREATE DATABASE ledger" postgres
diesel migration run >/dev/null
diesel print-schema > ledger-core/src/schema.rs
echo "wrote ledger-core/src/schema.rs"
