from datetime import datetime
from datetime import timedelta
from datetime import timezone

import pytest

from conftest import auth


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
