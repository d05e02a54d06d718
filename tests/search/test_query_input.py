"""A search query with no visible characters is refused (the server answers 400), as in the
API: searched, it would rank every image by nothing."""

from __future__ import annotations

import pytest

from mmca.search.query import QueryError


@pytest.mark.parametrize("text", ["\x00", "\u200b\u200c", "\ufeff \u2060"])
def test_a_query_of_invisible_characters_is_refused(searcher, text):
    with pytest.raises(QueryError, match="no visible characters") as err:
        searcher.search_text(text, 5)
    assert err.value.status == 400
    with pytest.raises(QueryError, match="no visible characters"):
        searcher.heatmap(text, 0)


def test_a_lone_surrogate_is_refused(searcher):
    with pytest.raises(QueryError, match="not valid Unicode text"):
        searcher.search_text("dog \ud800", 5)
