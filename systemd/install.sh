#!/bin/sh
# Install batchd as a systemd service (what `make install` runs).
#
#   sudo sh systemd/install.sh                  venv, units, config, sysusers, tmpfiles
#   sudo sh systemd/install.sh --instance intl  also set up batchd@intl.service
#   DESTDIR=/tmp/pkg sh systemd/install.sh --no-venv   stage into a folder (packaging, tests)
#
# What lands where (all under $DESTDIR when it is set):
#   /opt/batchd/venv                      python -m venv + pip install of this checkout,
#                                         with the `tokens` and `storage` extras
#   /opt/batchd/README.md, /opt/batchd/docs/*.md
#   /usr/local/bin/batchd                 a link to the venv's batchd, for operators
#   /etc/systemd/system/batchd.service, batchd@.service
#   /usr/lib/sysusers.d/batchd.conf       user batchd, groups batchd and batchd-operators
#   /usr/lib/tmpfiles.d/batchd.conf       /var/lib/batchd/{inbox,outbox,spool,state}
#   /etc/batchd/batchd.toml               the example configuration, never overwritten
#   /etc/batchd/batchd.toml.example       the example, always refreshed
#   with --instance NAME (repeatable):
#   /etc/batchd/NAME.toml                 never overwritten
#   /etc/tmpfiles.d/batchd-NAME.conf      /var/lib/batchd/NAME/{inbox,outbox,spool,state}
#
# It never writes an API key. Without DESTDIR it then applies the sysusers and tmpfiles
# entries and reloads systemd; with DESTDIR it touches nothing outside DESTDIR. It does
# not enable or start anything: the key has to be in place first (see the last lines).
#
# Options: --no-venv (skip the venv and pip), --instance NAME, --help.
# Environment: DESTDIR, PYTHON (python3), UNITDIR, SYSUSERSDIR, TMPFILESDIR, BINDIR.
set -eu

usage() {
    sed -n '2,/^set -eu/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

die() {
    echo "install.sh: $*" >&2
    exit 2
}

SRC=$(cd "$(dirname "$0")/.." && pwd)
DESTDIR=${DESTDIR:-}
PYTHON=${PYTHON:-python3}
PREFIX=/opt/batchd
UNITDIR=${UNITDIR:-/etc/systemd/system}
SYSUSERSDIR=${SYSUSERSDIR:-/usr/lib/sysusers.d}
TMPFILESDIR=${TMPFILESDIR:-/usr/lib/tmpfiles.d}
BINDIR=${BINDIR:-/usr/local/bin}
CONFDIR=/etc/batchd
LOCAL_TMPFILESDIR=/etc/tmpfiles.d
MAKE_VENV=yes
INSTANCES=""

add_instance() {
    # Instance names end up in paths and unit names: keep them plain.
    case $1 in
        "" | -* | .* | *[!A-Za-z0-9_.-]*)
            die "instance name '$1' may use only letters, digits, '_', '.', '-'" ;;
    esac
    INSTANCES="$INSTANCES $1"
}

while [ $# -gt 0 ]; do
    case $1 in
        --no-venv) MAKE_VENV=no ;;
        --instance)
            [ $# -ge 2 ] || die "--instance needs a name"
            add_instance "$2"
            shift
            ;;
        --instance=*) add_instance "${1#--instance=}" ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (try --help)" ;;
    esac
    shift
done

for f in systemd/batchd.service systemd/batchd@.service systemd/batchd.sysusers \
    systemd/batchd.tmpfiles config/batchd.toml; do
    [ -f "$SRC/$f" ] || die "$SRC/$f is missing: run this from a batchd checkout"
done

say() {
    echo "install.sh: $*"
}

# install_file MODE SOURCE TARGET: copy, creating the folder (0755) first.
install_file() {
    install -d -m 0755 "$(dirname "$DESTDIR$3")"
    install -m "$1" "$2" "$DESTDIR$3"
    say "installed $3"
}

# install_new MODE SOURCE TARGET: like install_file, but an existing target is kept.
install_new() {
    if [ -e "$DESTDIR$3" ]; then
        say "kept existing $3"
    else
        install_file "$@"
    fi
}

if [ "$MAKE_VENV" = yes ]; then
    install -d -m 0755 "$DESTDIR$PREFIX"
    "$PYTHON" -m venv "$DESTDIR$PREFIX/venv"
    "$DESTDIR$PREFIX/venv/bin/python" -m pip install --quiet --upgrade pip
    # Built from a copy: setuptools would leave build/ and *.egg-info in the checkout.
    # With the `tokens` extra: without it the daemon counts tokens with an upper bound
    # (about twice the real count) instead of Qwen's own vocabulary; with `storage`, so
    # that any folder may be a bucket (oss://, s3://) without another install.
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' EXIT
    cp -R "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/batchd" "$stage/"
    "$DESTDIR$PREFIX/venv/bin/python" -m pip install --quiet --upgrade "$stage[tokens,storage]"
    rm -rf "$stage"
    trap - EXIT
    say "installed $PREFIX/venv ($("$DESTDIR$PREFIX/venv/bin/batchd" --version))"
fi
install_file 0644 "$SRC/README.md" "$PREFIX/README.md"
for page in "$SRC"/docs/*.md; do
    install_file 0644 "$page" "$PREFIX/docs/$(basename "$page")"
done
# On PATH for operators: `batchd status` finds the unit's socket with no flags.
install -d -m 0755 "$DESTDIR$BINDIR"
ln -sfn "$PREFIX/venv/bin/batchd" "$DESTDIR$BINDIR/batchd"
say "linked $BINDIR/batchd -> $PREFIX/venv/bin/batchd"

install_file 0644 "$SRC/systemd/batchd.service" "$UNITDIR/batchd.service"
install_file 0644 "$SRC/systemd/batchd@.service" "$UNITDIR/batchd@.service"
install_file 0644 "$SRC/systemd/batchd.sysusers" "$SYSUSERSDIR/batchd.conf"
install_file 0644 "$SRC/systemd/batchd.tmpfiles" "$TMPFILESDIR/batchd.conf"

install -d -m 0755 "$DESTDIR$CONFDIR"
install_file 0644 "$SRC/config/batchd.toml" "$CONFDIR/batchd.toml.example"
install_new 0644 "$SRC/config/batchd.toml" "$CONFDIR/batchd.toml"

for name in $INSTANCES; do
    install_new 0644 "$SRC/config/batchd.toml" "$CONFDIR/$name.toml"
    conf="$LOCAL_TMPFILESDIR/batchd-$name.conf"
    install -d -m 0755 "$DESTDIR$LOCAL_TMPFILESDIR"
    {
        echo "# tmpfiles.d(5) for batchd@$name.service, written by systemd/install.sh."
        echo "# The same layout as /usr/lib/tmpfiles.d/batchd.conf, one level down."
        grep -v '^#' "$SRC/systemd/batchd.tmpfiles" | sed "s#/var/lib/batchd#/var/lib/batchd/$name#"
    } >"$DESTDIR$conf.tmp"
    chmod 0644 "$DESTDIR$conf.tmp"
    mv "$DESTDIR$conf.tmp" "$DESTDIR$conf"
    say "installed $conf"
done

if [ -z "$DESTDIR" ]; then
    systemd-sysusers batchd.conf
    systemd-tmpfiles --create batchd.conf
    for name in $INSTANCES; do
        systemd-tmpfiles --create "batchd-$name.conf"
    done
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
    fi
fi

# The key is never written by this script: it must not pass through a shell's history,
# a Makefile or a log. systemd hands it to the daemon as a credential.
cat <<EOF
install.sh: done. Next:
  1. Put the API key into $CONFDIR/api_key, readable by root only (systemd reads it and
     hands it to the daemon as the credential api_key):
       sudo install -m 0600 /dev/null $CONFDIR/api_key && sudoedit $CONFDIR/api_key
  2. Check $CONFDIR/batchd.toml (provider, limits).
  3. sudo systemctl enable --now batchd.service && systemctl status batchd.service
  Users who drop files: usermod -aG batchd USER. Operators: usermod -aG batchd-operators USER.
EOF
for name in $INSTANCES; do
    echo "  batchd@$name: key in $CONFDIR/$name.api_key (0600), config $CONFDIR/$name.toml,"
    echo "    then: sudo systemctl enable --now batchd@$name.service"
done
