#!/bin/sh
# The one-shot job of the compose network (service `pki`): make the network's development PKI and
# the UNSAFE development identity providers, once. Runs as the image's non-root user with /net
# holding directory.toml (read-only) and the volumes pki/ and idp/ (written here).
#
# DEMO ONLY. It makes every force's CA in one place and leaves the CA keys in the pki volume, which
# every gateway mounts read-only. A real force runs its own CA on an offline machine, gives each
# gateway only its own keys, and uses its real identity provider (docs/operators.md).
set -eu
cd /net

if [ -e pki/thames-valley/ca.pem ]; then
    echo "the network's PKI is already there (volume pki): nothing to do"
    exit 0
fi

psngw pki init --network-dir /net
psngw token init-idp --out /net/idp/thames-valley
psngw token init-idp --out /net/idp/hampshire
psngw token init-idp --out /net/idp/surrey
psngw pki list --ca-dir /net/pki/thames-valley
