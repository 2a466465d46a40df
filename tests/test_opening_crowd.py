"""The load tool's opening crowd (scripts/opening.py) against the real waitress server and PostgreSQL: people who log in, register or renew
their token, then buy; exact counts and every check."""

import asyncio

import opening

from conftest import TEST_SECRET
from conftest import sale_state


def test_opening_crowd_settles_everyone_with_exactly_the_stock_sold(live_server, make_user, database_url, db):
    admin_token = make_user(admin=True)[1]
    result = asyncio.run(opening.run_async(
        live_server, users=40, stock=10, duration=1.0, tokenless=10, newcomers=5, database_url=database_url,
        jwt_secret=TEST_SECRET, admin_token=admin_token, seed=3, log=lambda _: None))
    assert result['verdict'] == 'pass', result['checks']
    assert result['roles'] == {'login': 10, 'register': 5, 'refresh': 25}
    assert result['ends'] == {'201': 10, '409 sold_out': 30}
    assert result['answers']['login 200'] == 10 and result['answers']['register 201'] == 5
    assert result['answers']['refresh 200'] == 25
    assert result['latency_ms']['login']['p99'] is not None and result['last_settled_s'] is not None
    [sale_id] = [row['id'] for row in db.execute("SELECT id FROM flash_sales WHERE name LIKE 'opening crowd %'")]
    assert sale_state(db, sale_id) == (10, 0, 10)
    assert db.execute('SELECT count(DISTINCT user_id) AS n FROM orders').fetchone()['n'] == 10


def test_opening_crowd_prepares_through_the_api_without_database_access(live_server, make_user, db):
    admin_token = make_user(admin=True)[1]
    result = asyncio.run(opening.run_async(
        live_server, users=12, stock=3, duration=0.5, tokenless=4, admin_token=admin_token, seed=5,
        log=lambda _: None))
    assert result['verdict'] == 'pass', result['checks']
    assert result['ends'] == {'201': 3, '409 sold_out': 9}


def test_minted_tokens_are_what_the_server_issues(credentials, make_user):
    import jwt

    user_id, _ = make_user()
    claims = jwt.decode(opening.mint_token(TEST_SECRET, user_id), TEST_SECRET, algorithms=['HS256'])
    assert claims['sub'] == str(user_id) and claims['gen'] == 0 and claims['exp'] - claims['iat'] == 3600
