# syntax=docker/dockerfile:1
#
# garage-init in deploy/compose-garage.yaml: the garage CLI of the Garage image, which is
# `FROM scratch` with only the (static) binary in it, copied beside a shell to run
# init-garage.sh (mounted by compose). Keep GARAGE_IMAGE the garage service's image: the CLI
# and the server speak the same RPC version.
ARG GARAGE_IMAGE=dxflrs/garage:v2.5.0
FROM ${GARAGE_IMAGE} AS garage

FROM busybox:1.37
COPY --from=garage /garage /usr/local/bin/garage
ENTRYPOINT ["sh"]
