"""Class names: the one fallback to VOC's names when neither the data config nor a checkpoint gives them."""

from fcnseg.data.classes import VOC_CLASSES, class_names_for


def test_given_names_win_and_the_fallback_is_vocs_then_numbered():
    assert class_names_for(3, ["sky", "road", "car"]) == ["sky", "road", "car"]
    assert class_names_for(3) == ["background", "aeroplane", "bicycle"]
    assert class_names_for(23)[-3:] == [VOC_CLASSES[-1], "class_21", "class_22"]
