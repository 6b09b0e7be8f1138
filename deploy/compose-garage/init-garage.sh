#!/bin/sh
# Prepares the Garage node of deploy/compose-garage.yaml for regmirror. Idempotent: run it as
# often as you like.
#
#   1. gives the node a role in the cluster layout (a fresh node has none and stores nothing),
#   2. creates the bucket,
#   3. imports the access key the replicas use (an ID and secret you chose, not a generated
#      one, so that they can be set in the environment of both this and the replicas),
#   4. lets that key read, write and own the bucket (owner: it may set the lifecycle rule).
#
# compose-garage.yaml runs it as the one-shot service garage-init. By hand, against the
# running garage service, from the repository root:
#
#   GARAGE="docker compose -f deploy/compose-garage.yaml exec -T garage /garage" \
#     S3_ACCESS_KEY_ID=GK... S3_SECRET_ACCESS_KEY=... sh deploy/compose-garage/init-garage.sh
#
# Environment:
#   S3_ACCESS_KEY_ID      the key's ID: GK and 24 hex digits, e.g. GK$(openssl rand -hex 12)
#   S3_SECRET_ACCESS_KEY  its secret: 64 hex digits, e.g. $(openssl rand -hex 32)
#   GARAGE_BUCKET         the bucket (regmirror)
#   GARAGE_ZONE           the node's zone (dc1)
#   GARAGE_CAPACITY       the node's capacity in the layout (10G)
#   GARAGE                the garage command line (garage)
set -eu

GARAGE=${GARAGE:-garage}
BUCKET=${GARAGE_BUCKET:-regmirror}
ZONE=${GARAGE_ZONE:-dc1}
CAPACITY=${GARAGE_CAPACITY:-10G}
KEY_ID=${S3_ACCESS_KEY_ID:?set S3_ACCESS_KEY_ID}
SECRET=${S3_SECRET_ACCESS_KEY:?set S3_SECRET_ACCESS_KEY}

say() {
    echo "init-garage: $*" >&2
}

cli() {
    # shellcheck disable=SC2086 # GARAGE is a command line: split on purpose
    $GARAGE "$@"
}

# Up to 30 tries, 2 s apart.
retry() {
    tries=1
    until "$@"; do
        if [ "$tries" -ge 30 ]; then
            return 1
        fi
        tries=$((tries + 1))
        sleep 2
    done
}

# Garage imports only keys of the shape it generates itself.
if ! printf '%s\n' "$KEY_ID" | grep -Eq '^GK[0-9a-f]{24}$'; then
    say "S3_ACCESS_KEY_ID must be GK and 24 lowercase hex digits: GK\$(openssl rand -hex 12)"
    exit 1
fi
if ! printf '%s\n' "$SECRET" | grep -Eq '^[0-9a-f]{64}$'; then
    say "S3_SECRET_ACCESS_KEY must be 64 lowercase hex digits: \$(openssl rand -hex 32)"
    exit 1
fi

answers() {
    cli status >/dev/null 2>&1
}
if ! retry answers; then
    say "garage does not answer:"
    cli status
    exit 1
fi

# Outputs are read whole, never piped into a reader that may stop early: the CLI aborts on a
# closed pipe.
#
# A fresh node is in layout version 0, with no role: give it one in version 1. A node that
# has a role keeps it (change it with `garage layout` yourself).
layout=$(cli layout show)
case "$layout" in
*"Current cluster layout version: 0"*)
    node=$(cli node id -q)
    node=${node%%@*}
    say "assigning node ${node} to zone ${ZONE} with capacity ${CAPACITY}"
    cli layout assign -z "$ZONE" -c "$CAPACITY" "$node" >/dev/null
    cli layout apply --version 1 >/dev/null
    ;;
esac

# Until the new layout is live, bucket and key operations may fail: retried.
bucket_exists() {
    if ! cli bucket info "$BUCKET" >/dev/null 2>&1; then
        say "creating bucket ${BUCKET}"
        cli bucket create "$BUCKET" >/dev/null
    fi
}
retry bucket_exists

key_imported() {
    if ! cli key info "$KEY_ID" >/dev/null 2>&1; then
        say "importing key ${KEY_ID}"
        cli key import --yes -n regmirror "$KEY_ID" "$SECRET" >/dev/null
    fi
}
retry key_imported
# The same ID with another secret: the replicas would be refused with the secret they have.
key=$(cli key info --show-secret "$KEY_ID")
case "$key" in
*"$SECRET"*) ;;
*)
    say "key ${KEY_ID} exists with another secret: delete it (garage key delete --yes ${KEY_ID}) or choose another ID"
    exit 1
    ;;
esac

cli bucket allow --read --write --owner "$BUCKET" --key "$KEY_ID" >/dev/null
say "bucket ${BUCKET} is ready for key ${KEY_ID}"
