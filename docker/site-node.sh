#!/bin/bash
# The site image's entry point (wsi-fl-site-node): a SuperNode that never runs the coordinator's code, and the
# site's own task runner next to it. Arguments are flower-supernode's (--superlink, --node-config, ...).
#
# flower-supernode --isolation process starts no task runner of Flower's (which would import the ClientApp from
# the coordinator's app bundle); `wsi-fl site-runner` polls its Runtime API on this container's loopback and runs
# each task with the ClientApp installed in this image, for releases the site policy approves (approved-apps),
# refusing the rest. One container for both rather than two sharing a network namespace: they share 127.0.0.1
# and the data, policy and state mounts without any wiring, start and stop together, and a restart policy
# restarts both; either one ending ends the other, so a SuperNode never runs here without its runner.
# --isolation process goes after the caller's arguments, so that it wins over any --isolation given.
set -uo pipefail
case " $* " in
  *" --help "* | *" -h "* | *" --version "* | *" -V "*) exec flower-supernode "$@" ;;
esac
port=9094  # flower-supernode's default Runtime API port; --port moves both
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --port) port="${args[i + 1]:-$port}" ;;
    --port=*) port="${args[i]#--port=}" ;;
  esac
done
flower-supernode "$@" --isolation process &
node=$!
wsi-fl site-runner --runtime-api "127.0.0.1:$port" &
runner=$!
stopped=0  # podman stop / docker stop: a normal end (exit 0); either one ending by itself: its status
trap 'stopped=1; kill -TERM "$node" "$runner" 2> /dev/null' TERM INT
wait -n "$node" "$runner"
status=$?
kill -TERM "$node" "$runner" 2> /dev/null
wait "$node" "$runner"
if [ "$stopped" = 1 ]; then exit 0; fi
exit "$status"
