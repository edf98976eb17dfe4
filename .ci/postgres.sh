#!/usr/bin/env bash
# Start a local PostgreSQL server for the preference-store tests and print its SQLAlchemy URL.
# Installs Debian's postgresql package when it is missing (CI runs as root on a Debian machine).
set -euo pipefail
if ! command -v pg_lsclusters >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
fi
cluster=$(pg_lsclusters --no-header | head -n1)
version=$(echo "$cluster" | awk '{print $1}')
name=$(echo "$cluster" | awk '{print $2}')
port=$(echo "$cluster" | awk '{print $3}')
if ! pg_lsclusters --no-header | head -n1 | grep -q online; then
    pg_ctlcluster "$version" "$name" start >&2
fi
su postgres -c "psql -q -p $port -tc \"select 1 from pg_roles where rolname='diffalign'\"" | grep -q 1 \
    || su postgres -c "psql -q -p $port -c \"create role diffalign login password 'diffalign' createdb\"" >&2
su postgres -c "psql -q -p $port -tc \"select 1 from pg_database where datname='diffalign_test'\"" | grep -q 1 \
    || su postgres -c "createdb -p $port -O diffalign diffalign_test" >&2
echo "postgresql+psycopg://diffalign:diffalign@localhost:$port/diffalign_test"
