"""Evaluation: FID/KID and image statistics, caption following (the pixel checker), the HTML report and the blind review page."""
