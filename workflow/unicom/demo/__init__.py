"""Stage: the offline demo data: openclipart images and their SVG titles and tags as a URL
list, plus a held-out split for evaluation."""
