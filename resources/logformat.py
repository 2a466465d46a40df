"""LOG_FORMAT=json: every log line one JSON object, for a log pipeline
(Loki, Elasticsearch, CloudWatch) to read without a parser of its own.

Each object has the time (UTC), level, logger and message of the text
format, the id of the request being served when the line was written (null
outside a request), and, for an access line (middleware.ACCESS_LINE), its
values by name: method, path, status, duration_ms. A traceback goes in
"exception" and a stack in "stack": JSON escapes their newlines, so a line
is always one line, as a client's path with a newline in it is.
"""

import json
import logging
from datetime import datetime
from datetime import timezone

from resources import middleware


class RequestIds(logging.Filter):
    """Stamps each record with the id of the request its thread is serving.
    A filter runs in the thread that logs, where the formatter may not."""

    def filter(self, record):
        record.request_id = middleware.current_request_id()
        return True


class JSONFormatter(logging.Formatter):
    def format(self, record):
        entry = {
            'time': datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec='milliseconds')
            .replace('+00:00', 'Z'),
            'level': record.levelname,
            'logger': record.name,
            'message': record.getMessage(),
            'request_id': getattr(record, 'request_id', None),
        }
        if record.msg == middleware.ACCESS_LINE and len(record.args) == len(middleware.ACCESS_FIELDS):
            access = dict(zip(middleware.ACCESS_FIELDS, record.args, strict=True))
            access['status'] = int(access['status'])
            access['duration_ms'] = round(access['duration_ms'], 1)
            if access['request_id'] == '-':  # refused before the app saw it (resources/serving.py)
                access['request_id'] = None
            entry.update(access)
        if record.exc_info:
            entry['exception'] = self.formatException(record.exc_info)
        if record.stack_info:
            entry['stack'] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)
