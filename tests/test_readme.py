"""The README's curl examples, run as printed against the real server."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / 'README.md'


def test_readme_curl_examples_work(live_server, database_url, make_sale, db, tmp_path):
    if shutil.which('curl') is None:
        if os.environ.get('CI'):
            pytest.fail('curl is missing in CI (.ci/run installs it)')
        pytest.skip('curl is not installed (apt-get install curl)')
    make_sale(name='Demo sale', stock=50)
    script = re.search(r'```bash\n(.*?)```', README.read_text(), re.S).group(1)
    script = script.replace('BASE=http://127.0.0.1:8000', f'BASE={live_server}')
    # The README runs the command from its virtual environment; here it is this interpreter's.
    script = script.replace('.venv/bin/flashsale', f'{sys.executable} -m flashsale')
    env = dict(os.environ, DATABASE_URL=database_url, JWT_SECRET='s' * 40)
    result = subprocess.run(
        ['bash', '-euo', 'pipefail', '-c', script], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert '"status":"ok"' in out
    assert out.count('"order":{') == 2  # the purchase, then "my order"
    assert '"code":"already_purchased"' in out
    assert '"name":"Winter boots"' in out
    assert db.execute("SELECT is_admin FROM users WHERE email = 'me@example.com'").fetchone()['is_admin']
