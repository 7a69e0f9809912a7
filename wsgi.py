"""Entry point: ``app`` for WSGI servers; ``python wsgi.py`` serves it with waitress."""

from waitress import serve

from app import create_app

app = create_app()


def main():
    settings = app.extensions["llm_proxy"].settings
    server = settings.server
    serve(app, host=server.host, port=server.port, threads=server.threads,
          connection_limit=server.connection_limit, channel_timeout=server.channel_timeout,
          # waitress guards the extreme; the app answers the usual 413 as OpenAI JSON
          max_request_body_size=int(server.max_request_body_mb * 2 * 1024 * 1024),
          channel_request_lookahead=1, ident="llm-proxy", clear_untrusted_proxy_headers=True)


if __name__ == "__main__":
    main()
