#!/bin/sh
# Install bwpredd as a systemd service:
#   /opt/bwpredd/venv                 a virtualenv with bwpredd (non-editable, no torch)
#   /etc/systemd/system/bwpredd.service
#   /etc/bwpredd/bwpredd.toml         only if absent: an edited config is kept
#   group "bwpred"                    members may connect to /run/bwpredd/bwpredd.sock
# then `systemctl daemon-reload`. It neither enables, starts nor restarts the
# service; it prints what to run next.
#
# Usage, from the repository root:
#   make install && sudo make install-systemd      (or: sudo sh deploy/install.sh)
#
# Environment:
#   PYTHON     interpreter the venv is made from (default: python3, >= 3.11).
#              It must not live under /home, /root or /run/user: the unit has
#              ProtectHome=yes, so the service could not read it.
#   PREFIX     where the venv goes (default /opt/bwpredd); ExecStart follows.
#   DESTDIR    stage the files under this directory instead of /; no group is
#              created and systemctl is not called. (A venv is not relocatable:
#              one staged under DESTDIR only runs from there.)
#   BWPREDD_INSTALL_SKIP_VENV=1   do not create the venv or pip install
#              (the tests check where the files land without paying for pip).
#
# Whatever the caller's umask (root's is often 077), what this script creates
# is readable by the service's user, which is neither root nor in its group:
# under 077 the venv was 0700 and systemd failed with 203/EXEC.
set -eu
umask 022

SRC=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
PREFIX=${PREFIX:-/opt/bwpredd}
DESTDIR=${DESTDIR:-}
GROUP=bwpred
UNIT_DIR=$DESTDIR/etc/systemd/system
CONF_DIR=$DESTDIR/etc/bwpredd
VENV=$DESTDIR$PREFIX/venv

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

case $PREFIX in
    /*) ;;
    *) die "PREFIX must be an absolute path, got '$PREFIX'" ;;
esac
if [ -z "$DESTDIR" ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (sudo make install-systemd), or set DESTDIR to stage the files"
fi

# The group that may reach the socket. With DynamicUser=yes, systemd uses an
# existing static group named in Group= as the service's group.
if [ -z "$DESTDIR" ]; then
    if ! getent group "$GROUP" >/dev/null; then
        groupadd --system "$GROUP"
        say "created system group $GROUP"
    fi
fi

if [ "${BWPREDD_INSTALL_SKIP_VENV:-}" != 1 ]; then
    [ -f "$SRC/bwpredd/_proto/bwpred/v1/bwpred_pb2.py" ] \
        || die "generated gRPC code is missing: run 'make install' first"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$PYTHON is older than Python 3.11"
    base=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.base_prefix))')
    case $base in
        /home/* | /root/* | /root | /run/user/*)
            die "$PYTHON lives in $base, which the service cannot read (ProtectHome=yes); use a system python3 >= 3.11 (PYTHON=/usr/bin/python3.11)" ;;
    esac
    # The directories above the venv that exist already are not the
    # installer's to change (those it makes are 0755): refuse if the
    # service's user could not pass through one of them.
    dir=$DESTDIR
    rest=${PREFIX#/}
    while [ -n "$rest" ]; do
        dir=$dir/${rest%%/*}
        case $rest in */*) rest=${rest#*/} ;; *) rest= ;; esac
        [ -e "$dir" ] || break
        mode=$(stat -L -c %a "$dir")
        [ $((0$mode & 1)) -eq 1 ] \
            || die "${dir#"$DESTDIR"} has mode $mode: the service's user could not reach $PREFIX/venv through it (chmod o+x it, or choose another PREFIX)"
    done
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
        say "created $VENV"
    fi
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # Build the wheel once; install it with its dependencies, then force the
    # package itself so a rebuilt embedded model (make export) replaces the
    # installed one even when the version number did not change.
    wheels=$(mktemp -d)
    trap 'rm -rf "$wheels"' EXIT
    "$VENV/bin/python" -m pip wheel --quiet --no-deps --wheel-dir "$wheels" "$SRC"
    "$VENV/bin/python" -m pip install --quiet "$wheels"/bwpredd-*.whl
    "$VENV/bin/python" -m pip install --quiet --no-deps --force-reinstall "$wheels"/bwpredd-*.whl
    say "installed bwpredd into $VENV"

    # A venv left by an earlier run under a tighter umask keeps its modes
    # through pip: open it (the installer's own product) to the service's
    # user, read-only, and writable by no one but root.
    if [ -n "$(find "$VENV" \( -type d ! -perm -005 \) -o \( ! -type d ! -type l ! -perm -004 \) \
            -o \( ! -type l -perm /022 \) | head -n 1)" ]; then
        chmod -R u+rwX,go+rX,go-w "$VENV"
        say "made $VENV readable by the service (it was made under a tighter umask)"
    fi
fi

mkdir -p "$UNIT_DIR"
sed "s#^ExecStart=/opt/bwpredd/venv/bin/bwpredd #ExecStart=$PREFIX/venv/bin/bwpredd #" \
    "$SRC/deploy/bwpredd.service" >"$UNIT_DIR/bwpredd.service.tmp"
chmod 0644 "$UNIT_DIR/bwpredd.service.tmp"
mv -f "$UNIT_DIR/bwpredd.service.tmp" "$UNIT_DIR/bwpredd.service"
say "installed $UNIT_DIR/bwpredd.service"

mkdir -p "$CONF_DIR"
if [ -e "$CONF_DIR/bwpredd.toml" ]; then
    say "kept $CONF_DIR/bwpredd.toml (the shipped defaults: $SRC/deploy/bwpredd.toml)"
else
    install -m 0644 "$SRC/deploy/bwpredd.toml" "$CONF_DIR/bwpredd.toml"
    say "installed $CONF_DIR/bwpredd.toml"
fi
# A config directory or file kept from before (an edited config, or one an
# earlier install made under umask 077) is not changed: say what the
# service's user could not read, since it would fail with exit code 2.
mode=$(stat -L -c %a "$CONF_DIR")
[ $((0$mode & 1)) -eq 1 ] \
    || die "${CONF_DIR#"$DESTDIR"} has mode $mode: the service's user cannot read its config through it (chmod 0755 it)"
mode=$(stat -L -c %a "$CONF_DIR/bwpredd.toml")
[ $((0$mode & 4)) -eq 4 ] \
    || die "${CONF_DIR#"$DESTDIR"}/bwpredd.toml has mode $mode: the service's user cannot read it (chmod 0644 it)"

if [ -z "$DESTDIR" ]; then
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        say "systemctl daemon-reload: done"
    else
        say "systemd is not running here; run 'systemctl daemon-reload' where it is"
    fi
    say "next: systemctl enable --now bwpredd   (already running: systemctl reload bwpredd"
    say "      for a new model, systemctl restart bwpredd for new code or config)"
    say "      workers reach /run/bwpredd/bwpredd.sock through group $GROUP:"
    say "      SupplementaryGroups=$GROUP in their unit, or usermod -aG $GROUP <user>"
fi
