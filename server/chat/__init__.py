"""Chat completions: media preparation, OpenAI shapes, and the one pipeline both the HTTP route
and the job worker run (:mod:`framewise.server.chat.pipeline`)."""
