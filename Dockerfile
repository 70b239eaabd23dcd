# Builds the marketplace binary and runs `serve`. The image holds no database: mount a
# volume for the SQLite file or pass --database-url postgres://….
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin mcp-marketplace

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* && useradd --system --home /data market \
    && mkdir -p /data && chown market /data
COPY --from=build /src/target/release/mcp-marketplace /usr/local/bin/mcp-marketplace
USER market
WORKDIR /data
EXPOSE 8080
ENV MCP_MARKETPLACE_LISTEN=0.0.0.0:8080 \
    MCP_MARKETPLACE_DATABASE_URL=sqlite:///data/mcp-marketplace.db
ENTRYPOINT ["mcp-marketplace"]
CMD ["serve"]
