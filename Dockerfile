# pushgate container image: a multi-stage build; the runtime stage is distroless (glibc, CA
# certificates, no shell, no package manager) and runs as a non-root user.
#   docker build -t pushgate .
#   docker run --rm -p 50051:50051 -v $PWD/config:/etc/pushgate:ro pushgate \
#     serve --config /etc/pushgate/pushgate.toml
# The image holds the `pushgate` binary only: the mocks, the load tool and the demo are not in it.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The gateway crate alone: `pushgate-mocks` is a dev-dependency and is not built.
RUN cargo build --release --locked -p pushgate --bin pushgate \
 && cp target/release/pushgate /pushgate

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /pushgate /usr/local/bin/pushgate
USER 10001:10001
EXPOSE 50051 8080 9090
ENTRYPOINT ["/usr/local/bin/pushgate"]
CMD ["serve", "--config", "/etc/pushgate/pushgate.toml"]
