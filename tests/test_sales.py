from datetime import datetime
from datetime import timedelta
from datetime import timezone

import pytest

from conftest import auth
from resources import sales


def iso(dt):
    return dt.isoformat().replace('+00:00', 'Z')


def parse(value):
    return datetime.fromisoformat(value.replace('Z', '+00:00'))


def test_current_is_404_no_sale_when_there_is_none(client):
    resp = client.get('/api/flash-sales/current', status=404)
    assert resp.json['code'] == 'no_sale'


def test_current_prefers_active_sale_ending_first(client, make_sale):
    make_sale(name='upcoming', starts_in=10, ends_in=20)
    make_sale(name='active, ends later', starts_in=-10, ends_in=500)
    soonest = make_sale(name='active, ends first', starts_in=-5, ends_in=100)
    make_sale(name='ended', starts_in=-100, ends_in=-50)
    resp = client.get('/api/flash-sales/current', status=200)
    assert resp.json['flashSale']['id'] == str(soonest)
    assert resp.json['status'] == 'active'
    assert resp.json['flashSale']['status'] == 'active'


def test_current_falls_back_to_nearest_upcoming_then_latest_ended(client, make_sale, db):
    make_sale(name='ended long ago', starts_in=-1000, ends_in=-900)
    latest_ended = make_sale(name='ended lately', starts_in=-100, ends_in=-10)
    assert client.get('/api/flash-sales/current').json['flashSale']['id'] == str(latest_ended)
    assert client.get('/api/flash-sales/current').json['status'] == 'ended'
    make_sale(name='upcoming later', starts_in=500, ends_in=600)
    nearest = make_sale(name='upcoming soon', starts_in=50, ends_in=600)
    resp = client.get('/api/flash-sales/current')
    assert resp.json['flashSale']['id'] == str(nearest)
    assert resp.json['status'] == 'upcoming'


def test_sold_out_active_sale_stays_active_with_zero_stock(client, make_sale):
    make_sale(stock=5, remaining=0)
    resp = client.get('/api/flash-sales/current', status=200)
    assert resp.json['status'] == 'active'
    assert resp.json['flashSale']['remainingStock'] == 0
    assert resp.json['flashSale']['totalStock'] == 5


def test_current_carries_the_database_clock(client, make_sale, db):
    make_sale()
    resp = client.get('/api/flash-sales/current')
    db_now = db.execute('SELECT now() AS now').fetchone()['now']
    assert abs(parse(resp.json['serverTime']) - db_now) < timedelta(seconds=5)
    assert resp.json['serverTime'].endswith('Z')


def test_list_is_newest_first(client, make_sale):
    first = make_sale(name='first')
    second = make_sale(name='second')
    resp = client.get('/api/flash-sales', status=200)
    assert [s['id'] for s in resp.json['flashSales']] == [str(second), str(first)]
    assert 'serverTime' in resp.json


def insert_sales(db, count, seconds_apart):
    """`count` sales in one statement, created `seconds_apart` seconds apart
    (0: all at the same moment, the statement's now()): their ids."""
    return [row['id'] for row in db.execute(
        "INSERT INTO flash_sales (name, start_date, end_date, total_stock, remaining_stock, created_at) "
        "SELECT 'Sale ' || n, now(), now() + interval '1 hour', 1, 1, now() - n * make_interval(secs => %s) "
        'FROM generate_series(1, %s) AS n RETURNING id', (seconds_apart, count))]


def walk(client, limit=None):
    """Every page of the list, following nextCursor from the first: the pages."""
    pages, cursor = [], None
    while True:
        params = {**({'limit': limit} if limit else {}), **({'cursor': cursor} if cursor else {})}
        page = client.get('/api/flash-sales', params=params, status=200).json
        pages.append(page['flashSales'])
        cursor = page['nextCursor']
        if cursor is None:
            return pages


@pytest.mark.parametrize('limit', [None, 1, 7, sales.MAX_PAGE_SIZE])
def test_the_cursor_walks_every_sale_once_in_order_a_page_at_a_time(client, db, limit):
    # Ties on created_at too (one statement, one now()): id decides among them.
    insert_sales(db, 120, seconds_apart=0)
    insert_sales(db, 100, seconds_apart=0.5)
    insert_sales(db, 30, seconds_apart=0)
    pages = walk(client, limit)
    size = limit or sales.PAGE_SIZE
    assert all(len(page) == size for page in pages[:-1]) and 1 <= len(pages[-1]) <= size
    walked = [sale['id'] for page in pages for sale in page]
    expected = [str(row['id']) for row in db.execute('SELECT id FROM flash_sales ORDER BY created_at DESC, id')]
    assert walked == expected  # each once, newest first


def test_no_page_is_larger_than_the_largest(client, db):
    insert_sales(db, sales.MAX_PAGE_SIZE + 50, seconds_apart=1)
    first = client.get('/api/flash-sales', status=200).json
    assert len(first['flashSales']) == sales.PAGE_SIZE and first['nextCursor']
    most = client.get('/api/flash-sales', params={'limit': sales.MAX_PAGE_SIZE}, status=200).json
    assert len(most['flashSales']) == sales.MAX_PAGE_SIZE
    resp = client.get('/api/flash-sales', params={'limit': sales.MAX_PAGE_SIZE + 1}, status=400)
    assert (resp.json['code'], resp.json['field']) == ('invalid_parameter', 'limit')


def test_a_sale_created_while_walking_is_neither_repeated_nor_skipped_by_the_walk(client, db, make_sale):
    older = insert_sales(db, 5, seconds_apart=1)
    first = client.get('/api/flash-sales', params={'limit': 2}, status=200).json
    make_sale(name='newest')  # before the first page: not in this walk
    rest = client.get('/api/flash-sales', params={'cursor': first['nextCursor'], 'limit': 10}, status=200).json
    assert [s['id'] for s in first['flashSales'] + rest['flashSales']] == [str(i) for i in older]
    assert rest['nextCursor'] is None


def test_the_list_says_each_sale_as_the_sale_itself_does(client, db):
    """The list's JSON is made by the database (sql.LIST_SALES), a sale's by
    the app: the same objects, times to the microsecond (as stored) with Z."""
    db.execute("INSERT INTO flash_sales (name, start_date, end_date, total_stock, remaining_stock, created_at) VALUES "
               "('Open', now() - interval '1 hour', now() + interval '1 hour', 5, 2, now()), "
               "('Later', '2030-01-01 10:00:00.999999+00', '2030-01-01 12:00:00.0005+00', 7, 7, "
               " '2026-01-01 00:00:00.123999+00'), "
               "('Over', '2001-02-03 04:05:06+05:30', '2001-02-03 05:05:06+05:30', 1, 0, '2001-01-01 00:00:00+00')")
    listed = client.get('/api/flash-sales', status=200).json['flashSales']
    assert len(listed) == 3
    for sale in listed:
        assert sale == client.get(f"/api/flash-sales/{sale['id']}", status=200).json['flashSale']
    assert {s['status'] for s in listed} == {'active', 'upcoming', 'ended'}
    assert listed[1]['startDate'] == '2030-01-01T10:00:00.999999Z'
    assert listed[1]['endDate'] == '2030-01-01T12:00:00.000500Z'


def test_anonymous_pages_are_shared_for_the_cache_time_and_a_token_reads_fresh(make_app, make_sale, make_user):
    client = make_app(poll_cache_ms=60_000).client  # the whole test within one cache time

    def names(**kwargs):
        return [sale['name'] for sale in client.get('/api/flash-sales', status=200, **kwargs).json['flashSales']]

    make_sale(name='first')
    assert names() == ['first']
    make_sale(name='second')
    assert names() == ['first']
    # With a token (the admin's table), fresh; another page size is another page.
    assert names(headers=auth(make_user()[1])) == ['second', 'first']
    assert names(params={'limit': 10}) == ['second', 'first']


def test_an_empty_list_is_one_page(client):
    resp = client.get('/api/flash-sales', status=200).json
    assert (resp['flashSales'], resp['nextCursor']) == ([], None) and resp['serverTime'].endswith('Z')


@pytest.mark.parametrize(('query', 'field'), [
    ('limit=0', 'limit'), ('limit=-1', 'limit'), ('limit=abc', 'limit'), ('limit=1.5', 'limit'),
    ('limit=%C2%B2', 'limit'), ('limit=' + '9' * 40, 'limit'), ('limit=2&limit=3', 'limit'),
    ('cursor=nonsense', 'cursor'), ('cursor=' + 'A' * 300, 'cursor'), ('cursor=%E2%82%AC', 'cursor'),
    # Well-formed base64 of the wrong things: no date, a date without an offset, no id.
    ('cursor=bm9uZQ', 'cursor'), ('cursor=MjAyNi0wMS0wMVQwMDowMDowMHwwMDAwMDAwMC0wMDAwLTAwMDAtMDAwMC0wMDAwMDAwMDAwMDA', 'cursor'),
    ('cursor=MjAyNi0wMS0wMVQwMDowMDowMCswMDowMHw', 'cursor'),
])
def test_bad_list_parameters_are_400_invalid_parameter(client, query, field):
    resp = client.get(f'/api/flash-sales?{query}', status=400)
    assert (resp.json['code'], resp.json['field']) == ('invalid_parameter', field)
    assert resp.json['message'].startswith(f'"{field}"')


def test_get_one_sale_by_id(client, make_sale):
    sale_id = make_sale(name='Shoes', stock=7, starts_in=60, ends_in=120)
    resp = client.get(f'/api/flash-sales/{sale_id}', status=200)
    sale = resp.json['flashSale']
    assert (sale['name'], sale['totalStock'], sale['remainingStock']) == ('Shoes', 7, 7)
    assert resp.json['status'] == 'upcoming'


@pytest.mark.parametrize('sale_id', ['not-a-uuid', '00000000-0000-0000-0000-000000000000', "1' OR '1'='1"])
def test_unknown_or_malformed_sale_id_is_404(client, sale_id):
    resp = client.get(f'/api/flash-sales/{sale_id}', status=404)
    assert resp.json['code'] == 'sale_not_found'


def new_sale_body(**changes):
    now = datetime.now(timezone.utc)
    body = {
        'startDate': iso(now + timedelta(hours=1)),
        'endDate': iso(now + timedelta(hours=2)),
        'totalStock': 50,
        'name': 'Winter boots',
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def test_admin_creates_a_sale(client, make_user, db):
    _, token = make_user(admin=True)
    body = new_sale_body(startDate='2030-01-01T10:00:00+07:00', endDate='2030-01-01T12:00:00Z')
    resp = client.post_json('/api/flash-sales', body, headers=auth(token), status=201)
    sale = resp.json['flashSale']
    assert sale['startDate'] == '2030-01-01T03:00:00.000000Z'
    assert sale['endDate'] == '2030-01-01T12:00:00.000000Z'
    assert (sale['totalStock'], sale['remainingStock'], sale['status']) == (50, 50, 'upcoming')
    row = db.execute('SELECT total_stock, remaining_stock, name FROM flash_sales WHERE id = %s', (sale['id'],)).fetchone()
    assert row == {'total_stock': 50, 'remaining_stock': 50, 'name': 'Winter boots'}


def test_times_read_back_to_the_microsecond_they_were_written(client, make_user, db):
    """A sale whose end is 1 µs after its start is a valid sale, and reads
    back with the two times distinct: times are written as stored."""
    _, token = make_user(admin=True)
    start, end = '2030-01-01T10:00:00.123456Z', '2030-01-01T10:00:00.123457Z'
    resp = client.post_json('/api/flash-sales', new_sale_body(startDate=start, endDate=end),
                            headers=auth(token), status=201)
    sale_id = resp.json['flashSale']['id']
    row = db.execute('SELECT start_date, end_date, created_at FROM flash_sales WHERE id = %s', (sale_id,)).fetchone()
    assert row['end_date'] - row['start_date'] == timedelta(microseconds=1)
    for sale in (resp.json['flashSale'], client.get(f'/api/flash-sales/{sale_id}', status=200).json['flashSale']):
        assert (sale['startDate'], sale['endDate']) == (start, end)
        assert parse(sale['createdAt']) == row['created_at']  # the database's now(), to the microsecond


def test_name_is_optional(client, make_user):
    _, token = make_user(admin=True)
    resp = client.post_json('/api/flash-sales', new_sale_body(name=None), headers=auth(token), status=201)
    assert resp.json['flashSale']['name'] == 'Flash sale'


def test_creating_a_sale_needs_a_token(client, db):
    resp = client.post_json('/api/flash-sales', new_sale_body(), status=401)
    assert resp.json['code'] == 'unauthorized'


def test_non_admin_cannot_create_a_sale_whatever_the_body(client, make_user, db):
    _, token = make_user(admin=False)
    for body in (new_sale_body(), {'junk': True}):
        resp = client.post_json('/api/flash-sales', body, headers=auth(token), status=403)
        assert resp.json['code'] == 'forbidden'
    assert db.execute('SELECT count(*) AS n FROM flash_sales').fetchone()['n'] == 0


@pytest.mark.parametrize(
    ('changes', 'field'),
    [
        ({'startDate': '2030-01-01T10:00:00'}, 'startDate'),  # naive: refused, not guessed
        ({'endDate': '2030-01-01'}, 'endDate'),
        ({'startDate': 'tomorrow'}, 'startDate'),
        ({'startDate': 1700000000}, 'startDate'),
        ({'startDate': '2030-01-01T12:00:00Z', 'endDate': '2030-01-01T12:00:00Z'}, 'endDate'),
        ({'startDate': '2030-01-01T12:00:00Z', 'endDate': '2030-01-01T11:00:00Z'}, 'endDate'),
        ({'totalStock': 0}, 'totalStock'),
        ({'totalStock': -5}, 'totalStock'),
        ({'totalStock': 2.5}, 'totalStock'),
        ({'totalStock': '50'}, 'totalStock'),
        ({'totalStock': True}, 'totalStock'),
        ({'totalStock': 10**7}, 'totalStock'),
        ({'name': '   '}, 'name'),
        ({'name': 'x' * 201}, 'name'),
        ({'productId': 1}, 'productId'),
    ],
)
def test_bad_sale_bodies_are_400_and_write_nothing(client, make_user, db, changes, field):
    _, token = make_user(admin=True)
    resp = client.post_json('/api/flash-sales', new_sale_body(**changes), headers=auth(token), status=400)
    assert resp.json['field'] == field
    assert resp.json['code'] in ('invalid_field', 'unknown_field')
    assert db.execute('SELECT count(*) AS n FROM flash_sales').fetchone()['n'] == 0
